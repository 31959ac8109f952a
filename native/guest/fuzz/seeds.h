// Well-formed host->agent frames, one of each request type: the starting
// points the fuzz drivers mutate.
#pragma once

#include <vector>

#include "protocol.h"

namespace vmlet::agent::fuzz {

inline std::vector<std::vector<uint8_t>> SeedFrames() {
  std::vector<std::vector<uint8_t>> out;
  auto frame = [&](MsgType t, uint32_t id, PayloadWriter& w) { out.push_back(Frame(t, id, w.buf())); };
  {
    PayloadWriter w;
    w.U32(1);
    w.U32(1);
    w.Str("fuzz");
    frame(MsgType::Hello, 1, w);
  }
  {
    PayloadWriter w;
    w.U32(kExecTty);
    w.U32(3);
    w.Str("/bin/sh");
    w.Str("-c");
    w.Str("echo h\xc3\xa9llo; exit 7");
    w.U32(2);
    w.Str("PATH=/bin");
    w.Str("HOME=/root");
    w.Str("/tmp");
    w.Str("rootfs");
    w.Str("box");
    w.U32(1000);
    w.U32(1000);
    w.U32(2);
    w.U32(10);
    w.U32(20);
    w.U32(1);
    w.U32(7);
    w.U64(64);
    w.U64(128);
    w.U16(24);
    w.U16(80);
    frame(MsgType::Exec, 2, w);
  }
  {
    // Version 3: uid, gid and groups come from the user string.
    PayloadWriter w;
    w.U32(kExecUser);
    w.U32(1);
    w.Str("id");
    w.U32(1);
    w.Str("PATH=/bin");
    w.Str("");
    w.Str("rootfs");
    w.Str("");
    w.U32(0);
    w.U32(0);
    w.U32(0);
    w.U32(0);
    w.U16(0);
    w.U16(0);
    w.Str("nginx:staff");
    frame(MsgType::Exec, 4, w);
  }
  {
    PayloadWriter w;
    w.Str("rootfs");
    w.U32(2);
    w.Str("/dev/vda");
    w.Str("/dev/vdb");
    w.Str("tmpfs");
    frame(MsgType::MountRootfs, 3, w);
  }
  {
    PayloadWriter w;
    w.Raw("some stdin bytes\n", 17);
    frame(MsgType::Stdin, 2, w);
  }
  {
    PayloadWriter w;
    frame(MsgType::StdinEof, 2, w);
  }
  {
    PayloadWriter w;
    w.U32(2);
    w.U32(15);
    frame(MsgType::Signal, 6, w);
  }
  {
    PayloadWriter w;
    w.U32(2);
    w.U16(40);
    w.U16(120);
    frame(MsgType::Resize, 7, w);
  }
  {
    PayloadWriter w;
    w.U8(1);
    w.U32(65536);
    frame(MsgType::OutputWindow, 2, w);
  }
  {
    PayloadWriter w;
    w.U64(1800000000);
    w.U32(5);
    frame(MsgType::SetClock, 4, w);
  }
  {
    PayloadWriter w;
    frame(MsgType::Ping, 5, w);
  }
  {
    PayloadWriter w;
    w.U32(kIdentityClock | kIdentityHostname);
    w.U64(1800000000123456789ull);
    w.Str("sandbox-7f3a");
    for (uint8_t i = 0; i < 32; i++) w.U8(static_cast<uint8_t>(i * 37 + 11));
    frame(MsgType::SetIdentity, 8, w);
  }
  return out;
}

}  // namespace vmlet::agent::fuzz
