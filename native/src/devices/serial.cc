#include "devices/serial.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

#include "core/error.h"

namespace vmlet::devices {

namespace {
constexpr uint8_t kIerRda = 0x01;   // received data available
constexpr uint8_t kIerThre = 0x02;  // transmitter holding register empty
constexpr uint8_t kLcrDlab = 0x80;
constexpr uint8_t kMcrLoop = 0x10;
constexpr uint8_t kLsrDr = 0x01, kLsrThre = 0x20, kLsrTemt = 0x40;
constexpr uint8_t kIirNone = 0x01, kIirThre = 0x02, kIirRda = 0x04;
constexpr size_t kRxMax = 64;  // a 16550 FIFO is 16 bytes; loopback needs no more
}  // namespace

Serial::Serial(const std::string& log_path, std::shared_ptr<IrqLine> irq) : irq_(std::move(irq)) {
  if (log_path.empty())
    throw VmmError(ErrorKind::InvalidArgument, "set up serial console", "no serial log path given: set VmConfig.serialLog");
  fd_ = open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0)
    throw SysError(ErrorKind::Device, "open serial log " + log_path, "check that its directory exists and is writable");
}

Serial::~Serial() {
  std::lock_guard<std::mutex> g(mu_);
  FlushLocked();
  if (fd_ >= 0) close(fd_);
}

void Serial::Flush() {
  std::lock_guard<std::mutex> g(mu_);
  FlushLocked();
}

uint64_t Serial::bytes_written() const {
  std::lock_guard<std::mutex> g(mu_);
  return total_;
}

void Serial::FlushLocked() {
  size_t done = 0;
  while (done < out_.size()) {
    ssize_t n = write(fd_, out_.data() + done, out_.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // a full disk loses console output, never stops the guest
    done += static_cast<size_t>(n);
  }
  out_.clear();
}

// Line-buffered (serial.h): a crash of the host process loses at most the
// unfinished line.
void Serial::Emit(uint8_t byte) {
  out_.push_back(static_cast<char>(byte));
  total_++;
  if (byte == '\n' || out_.size() >= kLineMax) FlushLocked();
}

bool Serial::InterruptPending() const {
  return ((ier_ & kIerThre) && thre_pending_) || ((ier_ & kIerRda) && !rx_.empty());
}

// The line is an edge (a KVM_IRQ_LINE pulse): raise it when a condition newly appears.
void Serial::UpdateInterrupt(bool was_pending) {
  if (!was_pending && InterruptPending() && irq_) irq_->Trigger();
}

void Serial::Read(uint64_t offset, uint8_t* data, uint32_t len) {
  std::lock_guard<std::mutex> g(mu_);
  data[0] = ReadReg(offset);
  for (uint32_t i = 1; i < len; i++) data[i] = 0;
}

void Serial::Write(uint64_t offset, const uint8_t* data, uint32_t len) {
  if (len == 0) return;
  std::lock_guard<std::mutex> g(mu_);
  WriteReg(offset, data[0]);
}

// Reads only clear interrupt conditions, so they never raise an edge.
uint8_t Serial::ReadReg(uint64_t offset) {
  uint8_t v = 0;
  switch (offset) {
    case 0:
      if (lcr_ & kLcrDlab) {
        v = dll_;
      } else if (!rx_.empty()) {
        v = rx_.front();
        rx_.pop_front();
      }
      break;
    case 1: v = (lcr_ & kLcrDlab) ? dlm_ : ier_; break;
    case 2:
      // Reading IIR acknowledges a THRE interrupt (16550 datasheet), RDA has priority.
      if ((ier_ & kIerRda) && !rx_.empty()) {
        v = kIirRda;
      } else if ((ier_ & kIerThre) && thre_pending_) {
        v = kIirThre;
        thre_pending_ = false;
      } else {
        v = kIirNone;
      }
      if (fcr_ & 0x01) v |= 0xc0;
      break;
    case 3: v = lcr_; break;
    case 4: v = mcr_; break;
    case 5: v = kLsrThre | kLsrTemt | (rx_.empty() ? 0 : kLsrDr); break;
    case 6:
      if (mcr_ & kMcrLoop) {
        // Loopback wires DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
        v = static_cast<uint8_t>(((mcr_ & 0x02) << 3) | ((mcr_ & 0x01) << 5) | ((mcr_ & 0x04) << 4) | ((mcr_ & 0x08) << 4));
      } else {
        v = 0xb0;  // DCD, DSR, CTS: a cable is attached
      }
      break;
    case 7: v = scr_; break;
    default: v = 0; break;
  }
  return v;
}

void Serial::WriteReg(uint64_t offset, uint8_t v) {
  bool was = InterruptPending();
  switch (offset) {
    case 0:
      if (lcr_ & kLcrDlab) {
        dll_ = v;
      } else if (mcr_ & kMcrLoop) {
        if (rx_.size() < kRxMax) rx_.push_back(v);
        thre_pending_ = true;
      } else {
        Emit(v);
        thre_pending_ = true;
        // Each byte re-arms THRE: it must be seen as a new edge even if the
        // driver has not read IIR since the previous one.
        if ((ier_ & kIerThre) && irq_) {
          irq_->Trigger();
          return;
        }
      }
      break;
    case 1:
      if (lcr_ & kLcrDlab) {
        dlm_ = v;
      } else {
        bool thre_newly_enabled = !(ier_ & kIerThre) && (v & kIerThre);
        ier_ = v & 0x0f;
        if (thre_newly_enabled) thre_pending_ = true;
      }
      break;
    case 2: fcr_ = v; if (v & 0x02) rx_.clear(); break;
    case 3: lcr_ = v; break;
    case 4: mcr_ = v & 0x1f; break;
    case 7: scr_ = v; break;
    default: break;  // LSR/MSR are read-only
  }
  UpdateInterrupt(was);
}

void Serial::SaveState(snapshot::Writer& w) const {
  std::lock_guard<std::mutex> g(mu_);
  for (uint8_t v : {ier_, lcr_, mcr_, scr_, fcr_, dll_, dlm_}) w.U8(v);
  w.Bool(thre_pending_);
  std::string rx(rx_.begin(), rx_.end());
  w.Str(rx);
}

void Serial::RestoreState(snapshot::Reader& r) {
  std::lock_guard<std::mutex> g(mu_);
  for (uint8_t* v : {&ier_, &lcr_, &mcr_, &scr_, &fcr_, &dll_, &dlm_}) *v = r.U8();
  thre_pending_ = r.Bool();
  std::string rx = r.Str(kRxMax);
  rx_.assign(rx.begin(), rx.end());
  r.ExpectEnd();
}

}  // namespace vmlet::devices
