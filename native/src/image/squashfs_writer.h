// A squashfs image built from a tree held in memory plus file data streamed
// through libsquashfs' block processor as it arrives. File data is written
// in the order it is appended; inodes and directories are serialised at the
// end from the tree, in a fixed order, so the same tree and the same data
// always give the same bytes.
#pragma once
#include <sqfs/predef.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace vmlet::image {

struct FsNode {
  uint32_t mode = 0;  // S_IFMT type bits | permission bits
  uint32_t uid = 0;
  uint32_t gid = 0;
  uint32_t mtime = 0;
  std::map<std::string, std::string> xattrs;                // full names, e.g. "trusted.overlay.opaque"
  std::map<std::string, std::shared_ptr<FsNode>> children;  // directories; byte order = squashfs order
  std::string target;                                       // symlinks
  uint32_t devno = 0;                                       // devices, squashfs (old Linux) encoding
  // Regular files: the block processor keeps a pointer to this field and
  // grows/relocates the inode until Finish(), so a file node must stay alive
  // (SquashfsWriter holds it) even after the tree drops it.
  sqfs_inode_generic_t* data = nullptr;

  // Assigned during serialisation.
  uint32_t nlink = 0;
  uint32_t inode_num = 0;
  uint64_t inode_ref = 0;
  bool written = false;

  bool is_dir() const;
};

class SquashfsWriter {
 public:
  SquashfsWriter(const std::string& path, uint32_t block_size, unsigned workers, unsigned level = 0);
  ~SquashfsWriter();
  SquashfsWriter(const SquashfsWriter&) = delete;
  SquashfsWriter& operator=(const SquashfsWriter&) = delete;

  void BeginFile(const std::shared_ptr<FsNode>& file);
  void Append(const void* data, size_t size);
  // Appends `size` zero bytes (holes of sparse files); zero blocks are stored
  // as sparse blocks by the block processor, so they cost no space.
  void AppendZeros(uint64_t size);
  void EndFile();

  // Waits for the data blocks, writes inodes, directories, fragment, id and
  // xattr tables and the super block; returns the image size in bytes.
  uint64_t Finish(FsNode& root);

 private:
  void Release();
  void Check(int rc, const std::string& what);
  void Number(FsNode& dir, uint32_t& next);
  void Serialise(FsNode& dir, uint32_t parent_inode);
  void WriteInode(FsNode& node, sqfs_inode_generic_t* inode);
  uint32_t XattrIndex(const FsNode& node);

  std::string path_;
  uint32_t block_size_;
  sqfs_file_t* file_ = nullptr;
  sqfs_compressor_t* cmp_ = nullptr;
  sqfs_block_writer_t* blkwr_ = nullptr;
  sqfs_frag_table_t* frag_ = nullptr;
  sqfs_block_processor_t* proc_ = nullptr;
  sqfs_id_table_t* ids_ = nullptr;
  sqfs_xattr_writer_t* xwr_ = nullptr;
  sqfs_meta_writer_t* im_ = nullptr;
  sqfs_meta_writer_t* dm_ = nullptr;
  sqfs_dir_writer_t* dirwr_ = nullptr;
  bool in_file_ = false;
  bool finished_ = false;
  std::vector<std::shared_ptr<FsNode>> files_;
  std::vector<uint8_t> zeros_;
  std::unique_ptr<sqfs_super_t> super_;
};

}  // namespace vmlet::image
