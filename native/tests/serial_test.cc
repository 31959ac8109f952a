// The 8250 UART as Linux's driver and the test guest drive it: bytes reach the
// log in order, the THRE interrupt is raised when enabled and again for each
// byte, reading IIR acknowledges it, DLAB switches in the divisor, loopback
// reflects MCR into MSR and THR into RBR.
#include <unistd.h>

#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "core/error.h"
#include "devices/serial.h"
#include "testing.h"

using vmlet::devices::Serial;

namespace {

class CountingIrq : public vmlet::IrqLine {
 public:
  void Trigger() override { count++; }
  int count = 0;
};

struct Uart {
  std::string path = "/tmp/vmlet-serial-test-" + std::to_string(getpid()) + ".log";
  std::shared_ptr<CountingIrq> irq = std::make_shared<CountingIrq>();
  std::unique_ptr<Serial> dev = std::make_unique<Serial>(path, irq);
  ~Uart() { unlink(path.c_str()); }
  uint8_t In(uint64_t reg) {
    uint8_t v = 0xaa;
    dev->Read(reg, &v, 1);
    return v;
  }
  void Out(uint64_t reg, uint8_t v) { dev->Write(reg, &v, 1); }
  std::string Log() {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }
};

}  // namespace

TEST_CASE("serial: bytes written to THR reach the log in order, LSR always says the transmitter is empty") {
  Uart u;
  std::string text = "TG serial seq=0\r\n\x01\xff binary too\n";
  for (char c : text) {
    EXPECT_EQ(u.In(5) & 0x60, 0x60);  // THRE | TEMT before each byte, as the driver polls
    u.Out(0, static_cast<uint8_t>(c));
  }
  EXPECT(u.Log() == text);
  EXPECT_EQ(u.dev->bytes_written(), uint64_t{text.size()});
  EXPECT_EQ(u.irq->count, 0);  // interrupts were never enabled
}

TEST_CASE("serial: THRE interrupt fires on enable and after each byte; reading IIR acknowledges it") {
  Uart u;
  EXPECT_EQ(u.In(2) & 0x0f, 0x01);  // no interrupt pending
  u.Out(1, 0x02);                    // IER.ETBEI
  EXPECT_EQ(u.irq->count, 1);        // the empty transmitter interrupts at once
  EXPECT_EQ(u.In(2) & 0x0f, 0x02);   // IIR: THRE
  EXPECT_EQ(u.In(2) & 0x0f, 0x01);   // acknowledged by that read
  u.Out(0, 'a');
  EXPECT_EQ(u.irq->count, 2);
  u.Out(0, 'b');                     // not acknowledged in between: still a new edge
  EXPECT_EQ(u.irq->count, 3);
  EXPECT_EQ(u.In(2) & 0x0f, 0x02);
  u.Out(1, 0x00);
  u.Out(0, 'c');
  EXPECT_EQ(u.irq->count, 3);  // disabled: no interrupt
  u.dev->Flush();
  EXPECT(u.Log() == "abc");
}

TEST_CASE("serial: the log gets whole lines; an unfinished one waits for its end, Flush(), a full buffer or the device's end") {
  std::string path;
  {
    Uart u;
    path = u.path;
    for (char c : std::string("vmlet-agent: listen")) u.Out(0, static_cast<uint8_t>(c));
    EXPECT(u.Log().empty());  // no write(2) per byte
    EXPECT_EQ(u.dev->bytes_written(), uint64_t{19});  // counted as the guest sent them
    for (char c : std::string("ing\nnext")) u.Out(0, static_cast<uint8_t>(c));
    EXPECT(u.Log() == "vmlet-agent: listening\n");
    u.dev->Flush();
    EXPECT(u.Log() == "vmlet-agent: listening\nnext");
    u.dev->Flush();  // nothing left: writes nothing twice
    EXPECT(u.Log() == "vmlet-agent: listening\nnext");
    // A guest that never ends its line still reaches the log in kLineMax pieces.
    std::string log = u.Log();
    for (size_t i = 0; i < Serial::kLineMax; i++) u.Out(0, 'x');
    EXPECT_EQ(u.Log().size(), log.size() + Serial::kLineMax);
    u.Out(0, 'y');
    EXPECT_EQ(u.Log().size(), log.size() + Serial::kLineMax);
    // The device's end writes the rest.
    u.dev.reset();
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    EXPECT(ss.str() == log + std::string(Serial::kLineMax, 'x') + "y");
  }
}

TEST_CASE("serial: DLAB exposes the divisor latch instead of THR/IER, and FIFO enable shows in IIR") {
  Uart u;
  u.Out(3, 0x83);  // DLAB | 8N1
  u.Out(0, 0x01);  // divisor 1 = 115200 baud
  u.Out(1, 0x00);
  EXPECT_EQ(u.In(0), 0x01);
  EXPECT_EQ(u.In(1), 0x00);
  u.Out(3, 0x03);
  EXPECT_EQ(u.In(3), 0x03);
  EXPECT(u.Log().empty());  // the divisor write was not output
  u.Out(2, 0xc7);           // FIFO on
  EXPECT_EQ(u.In(2) & 0xc0, 0xc0);
  u.Out(7, 0x5a);
  EXPECT_EQ(u.In(7), 0x5a);  // scratch register, which Linux probes
}

TEST_CASE("serial: loopback mirrors MCR into MSR and THR into RBR (what the 8250 probe checks)") {
  Uart u;
  u.Out(4, 0x10 | 0x0a);  // LOOP | OUT2 | RTS
  EXPECT_EQ(u.In(6) & 0xf0, 0x90);  // DCD | CTS, as Linux's autoconfig expects
  u.Out(1, 0x01);                    // receive interrupt on
  u.Out(0, 'z');
  EXPECT_EQ(u.In(5) & 0x01, 0x01);   // data ready
  EXPECT_EQ(u.In(2) & 0x0f, 0x04);   // IIR: received data
  EXPECT_EQ(u.In(0), 'z');
  EXPECT_EQ(u.In(5) & 0x01, 0x00);
  EXPECT(u.Log().empty());  // looped back, not transmitted
  u.Out(4, 0x0b);
  EXPECT_EQ(u.In(6), 0xb0);  // a cable is attached: DCD, DSR, CTS
}

TEST_CASE("serial: a log path that cannot be opened is a DeviceError naming it") {
  bool threw = false;
  try {
    Serial s("/nonexistent-dir/serial.log", nullptr);
  } catch (const vmlet::VmmError& e) {
    threw = true;
    EXPECT(e.kind() == vmlet::ErrorKind::Device);
    EXPECT(std::string(e.what()).find("/nonexistent-dir/serial.log") != std::string::npos);
  }
  EXPECT(threw);
}
