// A 16550A-compatible UART at 0x3f8 (IRQ 4), enough for Linux's 8250 driver
// and the test guest: the register file with DLAB, loopback (Linux probes
// the modem-status lines through it), THRE and receive interrupts.
//
// The transmitter is infinitely fast: LSR always reports THRE|TEMT. Hazard:
// Linux writes only while it gets THRE interrupts once IER.ETBEI is set;
// without the edge on IRQ 4 after each byte or IER write, the console stalls
// after its first FIFO load.
//
// The log is line-buffered: bytes reach it at each '\n', when kLineMax bytes
// wait, on Flush() and when the device goes. One write(2) per line, not per
// byte: a reader following the log (vmlet's boot wait, a benchmark, tail -f)
// is woken once a line instead of once a byte, which in the lab cost the
// guest tens of ms per console line on a single host CPU. A line the guest
// leaves unfinished waits for its end, the next flush or the VM's end.
#pragma once
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>

#include "core/bus.h"
#include "snapshot/stream.h"

namespace vmlet::devices {

class Serial : public BusDevice {
 public:
  static constexpr uint64_t kBase = 0x3f8;
  static constexpr uint64_t kSize = 8;
  static constexpr uint32_t kIrq = 4;

  // Creates/truncates `log_path`; throws VmmError(Device) when it cannot.
  Serial(const std::string& log_path, std::shared_ptr<IrqLine> irq);
  ~Serial() override;

  void Read(uint64_t offset, uint8_t* data, uint32_t len) override;
  void Write(uint64_t offset, const uint8_t* data, uint32_t len) override;

  // Writes the unfinished line, if any, to the log.
  void Flush();
  static constexpr size_t kLineMax = 4096;
  uint64_t bytes_written() const;

  // Snapshot: the register file and pending receive bytes (the log is the
  // new VM's; output already written stays in the old one).
  void SaveState(snapshot::Writer& w) const;
  void RestoreState(snapshot::Reader& r);

 private:
  uint8_t ReadReg(uint64_t offset);
  void WriteReg(uint64_t offset, uint8_t v);
  void Emit(uint8_t byte);
  void FlushLocked();
  bool InterruptPending() const;
  void UpdateInterrupt(bool was_pending);

  mutable std::mutex mu_;
  int fd_ = -1;
  std::string out_;
  uint64_t total_ = 0;
  std::shared_ptr<IrqLine> irq_;
  uint8_t ier_ = 0, lcr_ = 0x03, mcr_ = 0x08, scr_ = 0, fcr_ = 0;
  uint8_t dll_ = 0x0c, dlm_ = 0;  // 9600 baud, what firmware leaves behind
  bool thre_pending_ = false;
  std::deque<uint8_t> rx_;
};

}  // namespace vmlet::devices
