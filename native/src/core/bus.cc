#include "core/bus.h"

namespace vmlet {

bool Bus::Insert(uint64_t base, uint64_t size, std::shared_ptr<BusDevice> dev) {
  if (size == 0 || base + size < base) return false;
  auto next = ranges_.lower_bound(base);
  if (next != ranges_.end() && next->first < base + size) return false;
  if (next != ranges_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second.size > base) return false;
  }
  ranges_.emplace(base, Range{size, std::move(dev)});
  return true;
}

const std::pair<const uint64_t, Bus::Range>* Bus::Find(uint64_t addr, uint32_t len) const {
  auto it = ranges_.upper_bound(addr);
  if (it == ranges_.begin()) return nullptr;
  --it;
  uint64_t off = addr - it->first;
  // The whole access must fall inside the device's window.
  if (off >= it->second.size || len > it->second.size - off) return nullptr;
  return &*it;
}

bool Bus::Read(uint64_t addr, uint8_t* data, uint32_t len) const {
  auto* r = Find(addr, len);
  if (!r) return false;
  r->second.dev->Read(addr - r->first, data, len);
  return true;
}

bool Bus::Write(uint64_t addr, const uint8_t* data, uint32_t len) const {
  auto* r = Find(addr, len);
  if (!r) return false;
  r->second.dev->Write(addr - r->first, data, len);
  return true;
}

}  // namespace vmlet
