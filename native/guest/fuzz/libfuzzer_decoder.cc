// libFuzzer entry over the same decoder (make -C native/guest libfuzzer; needs
// clang). Not part of npm test: run it by hand for open-ended fuzzing, e.g.
//   mkdir corpus && native/guest/build/vmlet-agent-fuzz --write-corpus corpus
//   native/guest/build/vmlet-agent-libfuzzer -max_total_time=600 corpus
#include <cstddef>
#include <cstdint>

#include "protocol.h"

using namespace vmlet::agent;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FrameDecoder dec;
  size_t off = 0;
  while (off < size) {
    off += dec.Feed(data + off, size - off);
    if (dec.Next() == FrameDecoder::Event::Frame) {
      HostMessage m;
      DecodeError err;
      DecodeHostMessage(dec.header(), dec.payload().data(), dec.payload().size(), &m, &err);
    }
  }
  return 0;
}
