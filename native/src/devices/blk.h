// virtio-blk (virtio 1.x section 5.2) backed by a host file.
#pragma once
#include <memory>
#include <string>

#include "virtio/device.h"

namespace vmlet {

struct BlkConfig {
  std::string path;        // regular file or block device; its size / 512 is the capacity
  bool read_only = false;  // advertises VIRTIO_BLK_F_RO; writes are answered with IOERR
  std::string id;          // VIRTIO_BLK_T_GET_ID answer, at most 20 bytes
  // A slot with no medium: no path, read-only, capacity 0. A template VM is
  // booted with such slots so that each restore can put its own image's
  // layers in them: a disk of 0 sectors in a snapshot may be restored onto a
  // file of any size (the guest never read a byte of it), and the guest is
  // told the new capacity with a configuration-change interrupt.
  bool empty = false;
};

// Opens the backing file now, so a missing or unreadable file is reported at
// VM creation. Throws VmmError(Device) naming the path and what to do.
std::shared_ptr<virtio::VirtioDevice> MakeVirtioBlk(const BlkConfig& config);

// Puts a read-only medium into an empty slot of a VM that may be running (a
// warm clone restored before anyone said which image it runs): its size
// becomes the capacity, and a driver already using the device is told by a
// configuration-change interrupt. Throws VmmError: InvalidArgument when the
// device is not virtio-blk or is no empty slot (a medium once given is never
// swapped: the guest may have cached its blocks), Device when the file cannot
// be opened or is under one sector.
void BlkAttachMedium(virtio::VirtioDevice& device, const std::string& path);

namespace blk {
// Wire constants, shared with the tests (virtio 1.x 5.2.3 and 5.2.6).
inline constexpr uint32_t kDeviceId = 2;
inline constexpr uint64_t kFeatureSizeMax = 1ull << 1;
inline constexpr uint64_t kFeatureSegMax = 1ull << 2;
inline constexpr uint64_t kFeatureRo = 1ull << 5;
inline constexpr uint64_t kFeatureBlkSize = 1ull << 6;
inline constexpr uint64_t kFeatureFlush = 1ull << 9;
inline constexpr uint32_t kTypeIn = 0;
inline constexpr uint32_t kTypeOut = 1;
inline constexpr uint32_t kTypeFlush = 4;
inline constexpr uint32_t kTypeGetId = 8;
inline constexpr uint8_t kStatusOk = 0;
inline constexpr uint8_t kStatusIoErr = 1;
inline constexpr uint8_t kStatusUnsupported = 2;
inline constexpr uint32_t kSectorSize = 512;
inline constexpr uint32_t kIdBytes = 20;
// What we advertise. SEG_MAX follows QEMU (queue size - 2: header and status
// take the other two descriptors). SEG_MAX x SIZE_MAX stays under the 8 MiB
// chain cap (virtio/queue.h) on purpose: a chain over the cap is refused
// without a status byte, and Linux (which sets max_hw_sectors to UINT_MAX
// and only bounds a request by these two) could read a stale status as
// success. 126 x 64 KiB = 7.9 MiB per request.
inline constexpr uint16_t kQueueSize = 128;
inline constexpr uint32_t kSegMax = kQueueSize - 2;
inline constexpr uint32_t kSizeMax = 64u << 10;
}  // namespace blk

}  // namespace vmlet
