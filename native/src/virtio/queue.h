// Split virtqueues (virtio 1.x section 2.7) seen from the device side, and
// the descriptor-chain walker.
//
// Every field of a ring is written by the guest, possibly while we read it,
// possibly maliciously. Hazards handled here, each with a test in
// tests/virtio_queue_test.cc:
//  - addresses/lengths outside RAM: every access goes through GuestMemory;
//  - descriptor indexes >= queue size, `next` loops, chains longer than the
//    queue, indirect tables that are empty, misaligned in length, nested or
//    combined with NEXT: the chain is refused;
//  - a device-writable descriptor followed by a device-readable one
//    (virtio 1.x 2.7.4.2: readable ones come first): refused;
//  - total chain length above a cap (8 MiB by default, tighter per device):
//    refused before anything is copied, so a chain of four 4 GiB descriptors
//    costs nothing;
//  - an avail.idx that claims more than `size` new entries, or a head index
//    >= size: the ring itself is broken; the queue stops and the device asks
//    for a reset (DEVICE_NEEDS_RESET).
// A descriptor is copied out of guest memory once and only the copy is
// checked and used, so a guest rewriting it concurrently cannot slip past
// the checks (double fetch).
#pragma once
#include <sys/uio.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/guest_memory.h"

namespace vmlet::virtio {

inline constexpr uint16_t kDescFlagNext = 1;
inline constexpr uint16_t kDescFlagWrite = 2;
inline constexpr uint16_t kDescFlagIndirect = 4;
inline constexpr uint16_t kAvailFlagNoInterrupt = 1;
inline constexpr uint32_t kDefaultMaxChainBytes = 8u << 20;

// The guest-visible layout (little-endian; x86 only, so no byte swapping).
struct __attribute__((packed)) Descriptor {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};
static_assert(sizeof(Descriptor) == 16);
struct __attribute__((packed)) UsedElem {
  uint32_t id;
  uint32_t len;
};
static_assert(sizeof(UsedElem) == 8);

// One buffer of a chain, already translated: host points into guest RAM and
// stays valid while the GuestMemory lives.
struct Segment {
  uint64_t gpa = 0;
  uint32_t len = 0;
  uint8_t* host = nullptr;
};

struct DescriptorChain {
  uint16_t head = 0;
  std::vector<Segment> readable;  // device reads (driver -> device)
  std::vector<Segment> writable;  // device writes (device -> driver)
  uint64_t readable_bytes = 0;
  uint64_t writable_bytes = 0;

  // Copy `len` bytes at `offset` of the readable (resp. writable) byte
  // stream; false when the stream is shorter. The streams ignore how the
  // driver split them into descriptors (virtio 1.x 2.6.4: no framing assumed).
  bool ReadFrom(uint64_t offset, void* dst, uint64_t len) const;
  bool WriteTo(uint64_t offset, const void* src, uint64_t len) const;
  // Append iovecs covering [offset, offset+len) of a stream; false when short.
  static bool Iovecs(const std::vector<Segment>& segs, uint64_t offset, uint64_t len, std::vector<iovec>* out);
};

// Per-device limits on what a well-formed chain may look like.
struct ChainLimits {
  uint64_t max_total_bytes = kDefaultMaxChainBytes;
  uint32_t max_segment_bytes = 0;  // 0: no per-descriptor limit (blk: SIZE_MAX)
  uint32_t max_segments = 0;       // 0: no limit beyond the queue size (blk: SEG_MAX + 2)
  bool allow_zero_length = false;
};

enum class PopResult {
  kEmpty,       // nothing new in the avail ring
  kChain,       // *chain holds a valid chain; the caller owes AddUsed(head)
  kBadChain,    // chain->head is a well-formed head whose chain was refused;
                // the caller owes AddUsed(head, 0 or an error) and goes on
  kBrokenRing,  // the ring itself is unusable; the queue is stopped
};

struct Queue {
  // Transport-configured (virtio-mmio QueueNum, QueueDesc, QueueDriver, QueueDevice).
  uint16_t max_size = 0;
  uint16_t size = 0;
  bool ready = false;
  uint64_t desc_table = 0;
  uint64_t avail_ring = 0;
  uint64_t used_ring = 0;
  // Negotiated features that change how the ring is read.
  bool event_idx = false;
  bool indirect_allowed = false;

  // Device-side progress.
  uint16_t next_avail = 0;
  uint16_t next_used = 0;
  bool broken = false;
  // Used idx at the last interrupt we sent (EVENT_IDX suppression).
  uint16_t signalled_used = 0;
  bool signalled_used_valid = false;
  // Diagnostics: why the last chain/ring was refused and how often.
  std::string last_error;
  uint64_t refused_chains = 0;

  // Back to the reset state; max_size is kept.
  void Reset();
  // Why the configuration cannot be used, or "" if it can: size a power of 2
  // not above max_size, rings aligned (16/2/4) and entirely inside RAM.
  std::string Validate(const GuestMemory& mem) const;

  PopResult Pop(GuestMemory& mem, const ChainLimits& limits, DescriptorChain* chain);
  // Give back the chain popped last without using it (e.g. a socket had no
  // data after all). Only valid before the matching AddUsed.
  void UndoPop() { next_avail--; }
  // Publish one used element. false (and broken) if the used ring is outside RAM.
  bool AddUsed(GuestMemory& mem, uint16_t head, uint32_t len);
  // Whether the driver wants an interrupt for what was published since the
  // last one (avail.flags NO_INTERRUPT, or used_event with EVENT_IDX).
  bool NeedsInterrupt(GuestMemory& mem);
  // Whether the avail ring holds entries not yet popped (no side effects).
  bool HasAvailable(const GuestMemory& mem) const;
  // While a device thread drains this queue anyway, the driver need not
  // notify (VIRTQ_USED_F_NO_NOTIFY, virtio 1.x 2.7.7; what vhost does). Only
  // without EVENT_IDX: with it the device asks for one notify through
  // avail_event (Pop), and used.flags means nothing. Disable returns whether
  // it set the flag (false with EVENT_IDX or a ring outside RAM, which Pop
  // reports); then Enable is owed, and it returns true when the avail ring
  // holds entries not yet popped: the driver may have added them while the
  // flag was set and rightly not notified, so the caller pops again.
  bool DisableDriverNotifications(GuestMemory& mem);
  bool EnableDriverNotifications(GuestMemory& mem);

 private:
  PopResult Broken(std::string why);
  bool WalkChain(GuestMemory& mem, const ChainLimits& limits, uint16_t head, DescriptorChain* chain);
};

}  // namespace vmlet::virtio
