#include "image/squashfs_writer.h"

#include <sqfs/block.h>
#include <sqfs/block_processor.h>
#include <sqfs/block_writer.h>
#include <sqfs/compressor.h>
#include <sqfs/dir_writer.h>
#include <sqfs/error.h>
#include <sqfs/frag_table.h>
#include <sqfs/id_table.h>
#include <sqfs/inode.h>
#include <sqfs/io.h>
#include <sqfs/meta_writer.h>
#include <sqfs/super.h>
#include <sqfs/xattr_writer.h>
#include <sys/stat.h>

#include <cstdlib>
#include <cstring>
#include <thread>

#include "core/error.h"

namespace vmlet::image {

namespace {

const char* SqfsErrorText(int rc) {
  switch (rc) {
    case SQFS_ERROR_ALLOC: return "out of memory";
    case SQFS_ERROR_IO: return "I/O error on the output file";
    case SQFS_ERROR_COMPRESSOR: return "compressor failure";
    case SQFS_ERROR_INTERNAL: return "internal error in libsquashfs";
    case SQFS_ERROR_CORRUPTED: return "corrupted data";
    case SQFS_ERROR_UNSUPPORTED: return "unsupported by squashfs";
    case SQFS_ERROR_OVERFLOW: return "a size or count overflows the squashfs format";
    case SQFS_ERROR_OUT_OF_BOUNDS: return "out of bounds";
    case SQFS_ERROR_ARG_INVALID: return "invalid argument";
    case SQFS_ERROR_SEQUENCE: return "call sequence error";
    default: return "libsquashfs error";
  }
}

}  // namespace

bool FsNode::is_dir() const { return S_ISDIR(mode); }

void SquashfsWriter::Check(int rc, const std::string& what) {
  if (rc != 0) {
    throw VmmError(ErrorKind::Image, "write squashfs " + path_, what + ": " + SqfsErrorText(rc) + " (" + std::to_string(rc) + ")");
  }
}

SquashfsWriter::SquashfsWriter(const std::string& path, uint32_t block_size, unsigned workers, unsigned level)
    : path_(path), block_size_(block_size), super_(std::make_unique<sqfs_super_t>()) {
  if (block_size < SQFS_MIN_BLOCK_SIZE || block_size > SQFS_MAX_BLOCK_SIZE || (block_size & (block_size - 1)) != 0) {
    throw VmmError(ErrorKind::InvalidArgument, "write squashfs " + path,
                   "block size " + std::to_string(block_size) + " must be a power of two from 4096 to 1048576");
  }
  if (level != 0 && (level < SQFS_ZSTD_MIN_LEVEL || level > SQFS_ZSTD_MAX_LEVEL)) {
    throw VmmError(ErrorKind::InvalidArgument, "write squashfs " + path,
                   "zstd level " + std::to_string(level) + " must be from 1 to 22");
  }
  if (workers == 0) workers = std::max(1u, std::thread::hardware_concurrency());
  try {
    sqfs_compressor_config_t cfg;
    Check(sqfs_compressor_config_init(&cfg, SQFS_COMP_ZSTD, block_size, 0), "configure zstd");
    if (level != 0) cfg.level = level;
    Check(sqfs_compressor_create(&cfg, &cmp_), "create zstd compressor");
    file_ = sqfs_open_file(path.c_str(), SQFS_FILE_OPEN_OVERWRITE);
    if (!file_) throw SysError(ErrorKind::Image, "create " + path);
    // mtime 0: the super block must not carry the host's clock.
    Check(sqfs_super_init(super_.get(), block_size, 0, SQFS_COMP_ZSTD), "initialise super block");
    Check(sqfs_super_write(super_.get(), file_), "write super block");
    int opt = cmp_->write_options(cmp_, file_);
    if (opt < 0) Check(opt, "write compressor options");
    if (opt > 0) super_->flags |= SQFS_FLAG_COMPRESSOR_OPTIONS;
    blkwr_ = sqfs_block_writer_create(file_, SQFS_DEVBLK_SIZE, 0);
    frag_ = sqfs_frag_table_create(0);
    if (!blkwr_ || !frag_) Check(SQFS_ERROR_ALLOC, "create block writer");
    // Ten blocks in flight per worker (tar2sqfs' default): enough to keep
    // them busy, small enough that memory use does not grow with the layer.
    proc_ = sqfs_block_processor_create(block_size, cmp_, workers, workers * 10, blkwr_, frag_);
    if (!proc_) Check(SQFS_ERROR_ALLOC, "create block processor");
    ids_ = sqfs_id_table_create(0);
    xwr_ = sqfs_xattr_writer_create(0);
    im_ = sqfs_meta_writer_create(file_, cmp_, 0);
    dm_ = sqfs_meta_writer_create(file_, cmp_, SQFS_META_WRITER_KEEP_IN_MEMORY);
    if (!ids_ || !xwr_ || !im_ || !dm_) Check(SQFS_ERROR_ALLOC, "create metadata writers");
    dirwr_ = sqfs_dir_writer_create(dm_, 0);
    if (!dirwr_) Check(SQFS_ERROR_ALLOC, "create directory writer");
  } catch (...) {
    Release();
    throw;
  }
}

SquashfsWriter::~SquashfsWriter() { Release(); }

void SquashfsWriter::Release() {
  // Abandoned mid-layer: libsquashfs 1.2 frees neither the half-filled block
  // nor blocks still queued for its workers when destroyed (found by
  // native/fuzz: 128 KiB lost per failed layer in a long-lived node process),
  // so hand them through first; they land in the temporary file, which goes.
  if (proc_ && !finished_) {
    if (in_file_) sqfs_block_processor_end_file(proc_);
    sqfs_block_processor_sync(proc_);
  }
  in_file_ = false;
  // The block processor first: its workers may still write into file inodes.
  for (void* obj : {static_cast<void*>(proc_), static_cast<void*>(dirwr_), static_cast<void*>(dm_),
                    static_cast<void*>(im_), static_cast<void*>(xwr_), static_cast<void*>(ids_),
                    static_cast<void*>(frag_), static_cast<void*>(blkwr_), static_cast<void*>(cmp_),
                    static_cast<void*>(file_)}) {
    if (obj) sqfs_destroy(obj);
  }
  proc_ = nullptr; dirwr_ = nullptr; dm_ = nullptr; im_ = nullptr; xwr_ = nullptr;
  ids_ = nullptr; frag_ = nullptr; blkwr_ = nullptr; cmp_ = nullptr; file_ = nullptr;
  for (auto& f : files_) {
    if (f->data) sqfs_free(f->data);
    f->data = nullptr;
  }
  files_.clear();
}

void SquashfsWriter::BeginFile(const std::shared_ptr<FsNode>& file) {
  files_.push_back(file);
  Check(sqfs_block_processor_begin_file(proc_, &file->data, nullptr, 0), "begin file");
  in_file_ = true;
}

void SquashfsWriter::Append(const void* data, size_t size) {
  if (size > 0) Check(sqfs_block_processor_append(proc_, data, size), "append file data");
}

void SquashfsWriter::AppendZeros(uint64_t size) {
  if (zeros_.empty()) zeros_.resize(block_size_);
  while (size > 0) {
    size_t n = size < zeros_.size() ? static_cast<size_t>(size) : zeros_.size();
    Append(zeros_.data(), n);
    size -= n;
  }
}

void SquashfsWriter::EndFile() {
  in_file_ = false;
  Check(sqfs_block_processor_end_file(proc_), "end file");
}

// Post-order: every child (and every subtree) gets its number before its
// directory, which needs the children's numbers and the parent's number when
// its own inode is written. The root comes last, as mksquashfs does it.
void SquashfsWriter::Number(FsNode& dir, uint32_t& next) {
  uint32_t subdirs = 0;
  for (auto& [name, child] : dir.children) {
    if (child->is_dir()) {
      ++subdirs;
      child->nlink = 0;
      Number(*child, next);
    } else {
      if (child->inode_num == 0) {
        child->inode_num = next++;
        child->nlink = 0;
      }
      ++child->nlink;
    }
  }
  dir.nlink = 2 + subdirs;
  dir.inode_num = next++;
}

uint32_t SquashfsWriter::XattrIndex(const FsNode& node) {
  if (node.xattrs.empty()) return 0xFFFFFFFF;
  Check(sqfs_xattr_writer_begin(xwr_, 0), "begin xattrs");
  for (auto& [key, value] : node.xattrs) {
    Check(sqfs_xattr_writer_add(xwr_, key.c_str(), value.data(), value.size()), "add xattr " + key);
  }
  uint32_t idx = 0xFFFFFFFF;
  Check(sqfs_xattr_writer_end(xwr_, &idx), "end xattrs");
  return idx;
}

void SquashfsWriter::WriteInode(FsNode& node, sqfs_inode_generic_t* inode) {
  inode->base.mode = static_cast<sqfs_u16>(node.mode);
  inode->base.mod_time = node.mtime;
  inode->base.inode_number = node.inode_num;
  Check(sqfs_id_table_id_to_index(ids_, node.uid, &inode->base.uid_idx), "record uid");
  Check(sqfs_id_table_id_to_index(ids_, node.gid, &inode->base.gid_idx), "record gid");
  sqfs_u64 block = 0;
  sqfs_u32 offset = 0;
  sqfs_meta_writer_get_position(im_, &block, &offset);
  node.inode_ref = (block << 16) | offset;
  Check(sqfs_meta_writer_write_inode(im_, inode), "write inode");
  node.written = true;
}

void SquashfsWriter::Serialise(FsNode& dir, uint32_t parent_inode) {
  for (auto& [name, child] : dir.children) {
    if (child->is_dir()) {
      Serialise(*child, dir.inode_num);
      continue;
    }
    if (child->written) continue;
    FsNode& n = *child;
    uint32_t xattr = XattrIndex(n);
    if (S_ISREG(n.mode)) {
      sqfs_inode_generic_t* inode = n.data;
      if (!inode) Check(SQFS_ERROR_INTERNAL, "file without data inode");
      if (n.nlink > 1) Check(sqfs_inode_make_extended(inode), "extend file inode");
      Check(sqfs_inode_set_xattr_index(inode, xattr), "set xattr index");
      if (inode->base.type == SQFS_INODE_EXT_FILE) inode->data.file_ext.nlink = n.nlink;
      WriteInode(n, inode);
      continue;
    }
    size_t extra = S_ISLNK(n.mode) ? n.target.size() : 0;
    auto* inode = static_cast<sqfs_inode_generic_t*>(std::calloc(1, sizeof(sqfs_inode_generic_t) + extra));
    if (!inode) Check(SQFS_ERROR_ALLOC, "allocate inode");
    std::unique_ptr<sqfs_inode_generic_t, decltype(&std::free)> hold(inode, std::free);
    switch (n.mode & S_IFMT) {
      case S_IFLNK:
        inode->base.type = SQFS_INODE_SLINK;
        inode->data.slink.nlink = n.nlink;
        inode->data.slink.target_size = static_cast<sqfs_u32>(extra);
        inode->payload_bytes_available = static_cast<sqfs_u32>(extra);
        inode->payload_bytes_used = static_cast<sqfs_u32>(extra);
        std::memcpy(inode->extra, n.target.data(), extra);
        break;
      case S_IFCHR:
      case S_IFBLK:
        inode->base.type = S_ISCHR(n.mode) ? SQFS_INODE_CDEV : SQFS_INODE_BDEV;
        inode->data.dev.nlink = n.nlink;
        inode->data.dev.devno = n.devno;
        break;
      case S_IFIFO:
        inode->base.type = SQFS_INODE_FIFO;
        inode->data.ipc.nlink = n.nlink;
        break;
      default:
        Check(SQFS_ERROR_INTERNAL, "node of unknown type");
    }
    Check(sqfs_inode_set_xattr_index(inode, xattr), "set xattr index");
    WriteInode(n, inode);
  }

  Check(sqfs_dir_writer_begin(dirwr_, 0), "begin directory");
  for (auto& [name, child] : dir.children) {
    Check(sqfs_dir_writer_add_entry(dirwr_, name.c_str(), child->inode_num, child->inode_ref,
                                    static_cast<sqfs_u16>(child->mode)),
          "add directory entry " + name);
  }
  Check(sqfs_dir_writer_end(dirwr_), "end directory");
  sqfs_inode_generic_t* inode = sqfs_dir_writer_create_inode(dirwr_, 0, XattrIndex(dir), parent_inode);
  if (!inode) Check(SQFS_ERROR_ALLOC, "create directory inode");
  std::unique_ptr<sqfs_inode_generic_t, decltype(&sqfs_free)> hold(inode, sqfs_free);
  if (inode->base.type == SQFS_INODE_DIR) {
    inode->data.dir.nlink = dir.nlink;
  } else {
    inode->data.dir_ext.nlink = dir.nlink;
  }
  WriteInode(dir, inode);
}

uint64_t SquashfsWriter::Finish(FsNode& root) {
  finished_ = true;
  Check(sqfs_block_processor_finish(proc_), "finish data blocks");
  uint32_t next = 1;
  Number(root, next);
  super_->inode_count = next - 1;
  super_->inode_table_start = file_->get_size(file_);
  Serialise(root, next);
  Check(sqfs_meta_writer_flush(im_), "flush inode table");
  Check(sqfs_meta_writer_flush(dm_), "flush directory table");
  super_->root_inode_ref = root.inode_ref;
  super_->directory_table_start = file_->get_size(file_);
  Check(sqfs_meta_write_write_to_file(dm_), "write directory table");
  Check(sqfs_frag_table_write(frag_, file_, super_.get(), cmp_), "write fragment table");
  Check(sqfs_id_table_write(ids_, file_, super_.get(), cmp_), "write id table");
  Check(sqfs_xattr_writer_flush(xwr_, file_, super_.get(), cmp_), "write xattr table");
  super_->bytes_used = file_->get_size(file_);
  Check(sqfs_super_write(super_.get(), file_), "update super block");
  // Padding to the device block size: loop devices and block-device images
  // are read in 4 KiB units, like mksquashfs' output.
  uint64_t size = super_->bytes_used;
  if (size % SQFS_DEVBLK_SIZE != 0) {
    std::vector<uint8_t> pad(SQFS_DEVBLK_SIZE - size % SQFS_DEVBLK_SIZE);
    Check(file_->write_at(file_, size, pad.data(), pad.size()), "pad image");
    size += pad.size();
  }
  return size;
}

}  // namespace vmlet::image
