#include "virtio/queue.h"

#include <atomic>
#include <cstring>

namespace vmlet::virtio {

namespace {

// Offsets inside the rings (virtio 1.x 2.7.6 and 2.7.8).
constexpr uint64_t kAvailFlags = 0, kAvailIdx = 2, kAvailRing = 4;
constexpr uint64_t kUsedFlags = 0, kUsedIdx = 2, kUsedRing = 4;
constexpr uint16_t kUsedFlagNoNotify = 1;

template <typename Copy>
bool WalkStream(const std::vector<Segment>& segs, uint64_t offset, uint64_t len, Copy copy) {
  for (const auto& s : segs) {
    if (len == 0) break;
    if (offset >= s.len) {
      offset -= s.len;
      continue;
    }
    uint64_t n = std::min<uint64_t>(s.len - offset, len);
    copy(s.host + offset, n);
    offset = 0;
    len -= n;
  }
  return len == 0;
}

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

bool DescriptorChain::ReadFrom(uint64_t offset, void* dst, uint64_t len) const {
  if (offset > readable_bytes || len > readable_bytes - offset) return false;
  auto* out = static_cast<uint8_t*>(dst);
  return WalkStream(readable, offset, len, [&](uint8_t* p, uint64_t n) {
    std::memcpy(out, p, n);
    out += n;
  });
}

bool DescriptorChain::WriteTo(uint64_t offset, const void* src, uint64_t len) const {
  if (offset > writable_bytes || len > writable_bytes - offset) return false;
  auto* in = static_cast<const uint8_t*>(src);
  return WalkStream(writable, offset, len, [&](uint8_t* p, uint64_t n) {
    std::memcpy(p, in, n);
    in += n;
  });
}

bool DescriptorChain::Iovecs(const std::vector<Segment>& segs, uint64_t offset, uint64_t len, std::vector<iovec>* out) {
  return WalkStream(segs, offset, len, [&](uint8_t* p, uint64_t n) { out->push_back(iovec{p, static_cast<size_t>(n)}); });
}

void Queue::Reset() {
  uint16_t keep = max_size;
  *this = Queue{};
  max_size = keep;
}

std::string Queue::Validate(const GuestMemory& mem) const {
  if (size == 0 || size > max_size || (size & (size - 1)) != 0)
    return "queue size " + std::to_string(size) + " is not a power of 2 in 1.." + std::to_string(max_size);
  if (desc_table % 16) return "descriptor table at " + Hex(desc_table) + " is not 16-byte aligned";
  if (avail_ring % 2) return "avail ring at " + Hex(avail_ring) + " is not 2-byte aligned";
  if (used_ring % 4) return "used ring at " + Hex(used_ring) + " is not 4-byte aligned";
  // The +2 on both rings is used_event / avail_event (EVENT_IDX); the spec
  // sizes the rings with them whether or not the feature is negotiated.
  if (!mem.Slice(desc_table, 16ull * size)) return "descriptor table at " + Hex(desc_table) + " is outside guest RAM";
  if (!mem.Slice(avail_ring, 6 + 2ull * size)) return "avail ring at " + Hex(avail_ring) + " is outside guest RAM";
  if (!mem.Slice(used_ring, 6 + 8ull * size)) return "used ring at " + Hex(used_ring) + " is outside guest RAM";
  return "";
}

PopResult Queue::Broken(std::string why) {
  broken = true;
  last_error = std::move(why);
  return PopResult::kBrokenRing;
}

bool Queue::HasAvailable(const GuestMemory& mem) const {
  uint16_t idx;
  if (!ready || broken || !mem.LoadU16Acquire(avail_ring + kAvailIdx, &idx)) return false;
  return idx != next_avail;
}

PopResult Queue::Pop(GuestMemory& mem, const ChainLimits& limits, DescriptorChain* chain) {
  if (broken) return PopResult::kBrokenRing;
  if (!ready) return PopResult::kEmpty;
  uint16_t avail_idx;
  if (!mem.LoadU16Acquire(avail_ring + kAvailIdx, &avail_idx)) return Broken("avail ring is outside guest RAM");
  uint16_t pending = static_cast<uint16_t>(avail_idx - next_avail);
  if (pending == 0 && event_idx) {
    // Ask for a notification at the next entry, then look again: the driver
    // may have added one between our read and its check of avail_event, and
    // would then not notify (lost wake-up).
    if (!mem.StoreU16Release(used_ring + kUsedRing + 8ull * size, next_avail))
      return Broken("used ring is outside guest RAM");
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (!mem.LoadU16Acquire(avail_ring + kAvailIdx, &avail_idx)) return Broken("avail ring is outside guest RAM");
    pending = static_cast<uint16_t>(avail_idx - next_avail);
  }
  if (pending == 0) return PopResult::kEmpty;
  if (pending > size)
    return Broken("avail.idx " + std::to_string(avail_idx) + " claims " + std::to_string(pending) +
                  " new entries in a queue of " + std::to_string(size));
  uint16_t head;
  if (!mem.ReadObj(avail_ring + kAvailRing + 2ull * (next_avail % size), &head))
    return Broken("avail ring is outside guest RAM");
  // A head we cannot index cannot be returned either: the driver would not
  // recognise it in the used ring, so no request-level failure is possible.
  if (head >= size)
    return Broken("avail ring entry names descriptor " + std::to_string(head) + " in a queue of " +
                  std::to_string(size));
  next_avail++;
  if (!WalkChain(mem, limits, head, chain)) {
    refused_chains++;
    return PopResult::kBadChain;
  }
  return PopResult::kChain;
}

bool Queue::WalkChain(GuestMemory& mem, const ChainLimits& limits, uint16_t head, DescriptorChain* chain) {
  chain->head = head;
  chain->readable.clear();
  chain->writable.clear();
  chain->readable_bytes = chain->writable_bytes = 0;
  auto refuse = [&](std::string why) {
    last_error = "chain at descriptor " + std::to_string(head) + ": " + why;
    return false;
  };

  uint64_t table = desc_table;
  uint32_t table_size = size;
  bool in_indirect = false;
  uint32_t idx = head, visited = 0, segments = 0;
  uint64_t total = 0;
  for (;;) {
    if (idx >= table_size)
      return refuse("next index " + std::to_string(idx) + " is outside a table of " + std::to_string(table_size));
    // Each table may be visited at most once per entry: more means a loop.
    if (++visited > table_size) return refuse("chain is longer than its table (" + std::to_string(table_size) + "): a loop");
    Descriptor d;
    if (!mem.ReadObj(table + 16ull * idx, &d)) return refuse("descriptor table is outside guest RAM");

    if (d.flags & kDescFlagIndirect) {
      if (!indirect_allowed) return refuse("indirect descriptor without VIRTIO_F_INDIRECT_DESC");
      if (in_indirect) return refuse("indirect descriptor inside an indirect table");
      if (d.flags & kDescFlagNext) return refuse("indirect descriptor with NEXT set");
      if (d.len == 0 || d.len % 16) return refuse("indirect table length " + std::to_string(d.len) + " is not a non-zero multiple of 16");
      uint32_t n = d.len / 16;
      // A chain may not exceed the queue size (2.7.5.3.1), direct or not.
      if (n > size) return refuse("indirect table of " + std::to_string(n) + " entries exceeds the queue size");
      if (!mem.Slice(d.addr, d.len)) return refuse("indirect table at " + Hex(d.addr) + " is outside guest RAM");
      table = d.addr;
      table_size = n;
      in_indirect = true;
      idx = 0;
      visited = 0;
      continue;
    }

    if (d.len == 0 && !limits.allow_zero_length) return refuse("zero-length descriptor");
    if (limits.max_segment_bytes && d.len > limits.max_segment_bytes)
      return refuse("descriptor of " + std::to_string(d.len) + " bytes exceeds the segment limit " +
                    std::to_string(limits.max_segment_bytes));
    total += d.len;
    if (total > limits.max_total_bytes)
      return refuse("chain exceeds " + std::to_string(limits.max_total_bytes) + " bytes");
    if (limits.max_segments && ++segments > limits.max_segments)
      return refuse("chain has more than " + std::to_string(limits.max_segments) + " descriptors");
    auto span = mem.Slice(d.addr, d.len);
    if (!span) return refuse("buffer " + Hex(d.addr) + "+" + std::to_string(d.len) + " is outside guest RAM");
    Segment seg{d.addr, d.len, span->data};
    if (d.flags & kDescFlagWrite) {
      chain->writable.push_back(seg);
      chain->writable_bytes += d.len;
    } else {
      if (!chain->writable.empty()) return refuse("device-readable descriptor after a device-writable one");
      chain->readable.push_back(seg);
      chain->readable_bytes += d.len;
    }
    if (!(d.flags & kDescFlagNext)) return true;
    idx = d.next;
  }
}

bool Queue::AddUsed(GuestMemory& mem, uint16_t head, uint32_t len) {
  if (broken || !ready) return false;
  uint64_t slot = used_ring + kUsedRing + 8ull * (next_used % size);
  if (!mem.WriteObj(slot, UsedElem{head, len})) {
    Broken("used ring is outside guest RAM");
    return false;
  }
  next_used++;
  // Release: the driver must see the element before the index that covers it.
  if (!mem.StoreU16Release(used_ring + kUsedIdx, next_used)) {
    Broken("used ring is outside guest RAM");
    return false;
  }
  return true;
}

bool Queue::DisableDriverNotifications(GuestMemory& mem) {
  if (!ready || broken || event_idx) return false;
  return mem.StoreU16Release(used_ring + kUsedFlags, kUsedFlagNoNotify);
}

bool Queue::EnableDriverNotifications(GuestMemory& mem) {
  if (!ready || broken) return false;
  if (!event_idx && !mem.StoreU16Release(used_ring + kUsedFlags, 0)) return false;
  // The cleared flag must be visible before we read avail.idx again, or the
  // driver may still see NO_NOTIFY for an entry we then miss (lost wake-up).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return HasAvailable(mem);
}

bool Queue::NeedsInterrupt(GuestMemory& mem) {
  if (!ready || broken) return false;
  // Our used.idx store must be visible before we read the driver's
  // suppression state, or both sides may decide the other will act.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (event_idx) {
    uint16_t used_event;
    if (!mem.LoadU16Acquire(avail_ring + kAvailRing + 2ull * size, &used_event)) return true;
    uint16_t old = signalled_used, now = next_used;
    bool first = !signalled_used_valid;
    signalled_used = now;
    signalled_used_valid = true;
    if (first) return true;
    // vring_need_event (2.7.10): did used.idx move past used_event?
    return static_cast<uint16_t>(now - used_event - 1) < static_cast<uint16_t>(now - old);
  }
  uint16_t flags;
  if (!mem.LoadU16Acquire(avail_ring + kAvailFlags, &flags)) return true;
  return !(flags & kAvailFlagNoInterrupt);
}

}  // namespace vmlet::virtio
