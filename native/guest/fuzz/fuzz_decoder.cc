// Deterministic mutation fuzzing of the agent's frame and payload decoder,
// run by npm test for a bounded number of iterations (test/unit/agent-fuzz).
// Same seed, same inputs: a failure is reproducible from the printed seed and
// iteration. Built with ASan+UBSan, so a stray read is a crash, not luck.
//
//   vmlet-agent-fuzz [--iterations N] [--seed S]
//   vmlet-agent-fuzz --write-corpus DIR   (seed frames as files, for the libFuzzer target)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>

#include "fuzz/seeds.h"
#include "protocol.h"
#include "userdb.h"

using namespace vmlet::agent;

namespace {

struct Rng {
  uint64_t s;
  uint64_t Next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  }
  size_t Below(size_t n) { return n == 0 ? 0 : static_cast<size_t>(Next() % n); }
};

[[noreturn]] void Fail(uint64_t seed, long iter, const char* what) {
  std::fprintf(stderr, "vmlet-agent-fuzz: invariant broken at seed %llu iteration %ld: %s\n",
               static_cast<unsigned long long>(seed), iter, what);
  std::exit(1);
}

void Mutate(Rng& r, std::vector<uint8_t>& b) {
  switch (r.Below(8)) {
    case 0:  // flip a bit
      if (!b.empty()) b[r.Below(b.size())] ^= static_cast<uint8_t>(1u << r.Below(8));
      break;
    case 1:  // an interesting byte
      if (!b.empty()) {
        static const uint8_t kBytes[] = {0x00, 0xff, 0x7f, 0x80, 0xc0, 0xe0, 0xf0, 0xf8, 0xed, 0xa0};
        b[r.Below(b.size())] = kBytes[r.Below(sizeof kBytes)];
      }
      break;
    case 2:  // insert random bytes
    {
      size_t at = r.Below(b.size() + 1), n = 1 + r.Below(8);
      for (size_t i = 0; i < n; i++) b.insert(b.begin() + static_cast<long>(at), static_cast<uint8_t>(r.Next()));
      break;
    }
    case 3:  // delete a range
      if (!b.empty()) {
        size_t at = r.Below(b.size()), n = 1 + r.Below(std::min<size_t>(16, b.size() - at));
        b.erase(b.begin() + static_cast<long>(at), b.begin() + static_cast<long>(at + n));
      }
      break;
    case 4:  // truncate
      b.resize(r.Below(b.size() + 1));
      break;
    case 5:  // a 32-bit field set to a boundary value (lengths, counts)
      if (b.size() >= 4) {
        static const uint32_t kVals[] = {0, 1, 0xffffffffu, 0x7fffffffu, kMaxPayload, kMaxPayload + 1, 65536, 65537};
        uint32_t v = kVals[r.Below(8)];
        size_t at = r.Below(b.size() - 3);
        std::memcpy(b.data() + at, &v, 4);
      }
      break;
    case 6:  // a random message type
      if (b.size() >= kHeaderSize) {
        uint16_t t = static_cast<uint16_t>(r.Below(3) == 0 ? r.Next() : r.Below(0x13));
        std::memcpy(b.data() + 4, &t, 2);
      }
      break;
    case 7:  // duplicate a slice
      if (!b.empty()) {
        size_t at = r.Below(b.size()), n = 1 + r.Below(std::min<size_t>(32, b.size() - at));
        std::vector<uint8_t> s(b.begin() + static_cast<long>(at), b.begin() + static_cast<long>(at + n));
        b.insert(b.begin() + static_cast<long>(r.Below(b.size() + 1)), s.begin(), s.end());
      }
      break;
  }
}

// Re-checks a successful decode: every string that reached the agent is valid UTF-8.
bool StringsValid(const HostMessage& m) {
  auto ok = [](const std::string& s) { return ValidUtf8(reinterpret_cast<const uint8_t*>(s.data()), s.size()); };
  for (const auto& a : m.exec.args) if (!ok(a)) return false;
  for (const auto& e : m.exec.env) if (!ok(e)) return false;
  for (const auto& l : m.mount.layers) if (!ok(l)) return false;
  return ok(m.exec.cwd) && ok(m.exec.rootfs) && ok(m.exec.hostname) && ok(m.hello.client) && ok(m.mount.name) &&
         ok(m.mount.upper) && ok(m.identity.hostname) && ok(m.exec.user);
}

}  // namespace

int main(int argc, char** argv) {
  long iterations = 20000;
  uint64_t seed = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--write-corpus")) {
      auto frames = vmlet::agent::fuzz::SeedFrames();
      for (size_t k = 0; k < frames.size(); k++) {
        std::string path = std::string(argv[i + 1]) + "/seed-" + std::to_string(k);
        FILE* f = std::fopen(path.c_str(), "wb");
        if (!f || std::fwrite(frames[k].data(), 1, frames[k].size(), f) != frames[k].size()) {
          std::fprintf(stderr, "vmlet-agent-fuzz: cannot write %s\n", path.c_str());
          return 1;
        }
        std::fclose(f);
      }
      return 0;
    }
    if (!std::strcmp(argv[i], "--iterations")) iterations = std::atol(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--seed")) seed = std::strtoull(argv[i + 1], nullptr, 10);
    else {
      std::fprintf(stderr, "usage: vmlet-agent-fuzz [--iterations N] [--seed S] | --write-corpus DIR\n");
      return 2;
    }
  }
  Rng rng{seed * 0x9e3779b97f4a7c15ull + 1};
  auto seeds = vmlet::agent::fuzz::SeedFrames();
  std::map<std::string, long> outcomes;
  long frames = 0, oversized = 0;
  for (long it = 0; it < iterations; it++) {
    std::vector<uint8_t> input;
    size_t nframes = 1 + rng.Below(4);
    for (size_t i = 0; i < nframes; i++) {
      const auto& s = seeds[rng.Below(seeds.size())];
      input.insert(input.end(), s.begin(), s.end());
    }
    size_t nmut = 1 + rng.Below(4);
    for (size_t i = 0; i < nmut; i++) Mutate(rng, input);

    FrameDecoder dec;
    size_t off = 0;
    while (off < input.size()) {
      size_t chunk = 1 + rng.Below(std::min<size_t>(input.size() - off, 64));
      size_t used = 0;
      while (used < chunk) {
        size_t k = dec.Feed(input.data() + off + used, chunk - used);
        used += k;
        FrameDecoder::Event e = dec.Next();
        if (k == 0 && e == FrameDecoder::Event::None) Fail(seed, it, "Feed made no progress and reported nothing");
        if (e == FrameDecoder::Event::Oversized) {
          if (dec.header().length <= kMaxPayload) Fail(seed, it, "Oversized reported for an allowed length");
          oversized++;
        } else if (e == FrameDecoder::Event::Frame) {
          frames++;
          if (dec.payload().size() != dec.header().length) Fail(seed, it, "payload size differs from header length");
          HostMessage m;
          DecodeError err;
          // Per-type tallies for message types added after version 1, so the
          // test can tell their decoder was reached both ways, not just the
          // old types'.
          {
            // The passwd/group line parsers read image files an attacker may
            // have written: run them over the same hostile bytes under ASan.
            std::string_view bytes(reinterpret_cast<const char*>(dec.payload().data()), dec.payload().size());
            PasswdEntry pe;
            GroupEntry ge;
            if (ParsePasswdLine(bytes, &pe) && pe.name.empty()) Fail(seed, it, "passwd line parsed with an empty name");
            if (ParseGroupLine(bytes, &ge)) GroupListsMember(ge.members, ge.name);
          }
          bool identity = dec.header().type == static_cast<uint16_t>(MsgType::SetIdentity);
          // EXEC with the version-3 user flag: its trailing field is decoded.
          bool exec_user = dec.header().type == static_cast<uint16_t>(MsgType::Exec) && dec.payload().size() >= 4 &&
                           (dec.payload()[0] & kExecUser);
          if (DecodeHostMessage(dec.header(), dec.payload().data(), dec.payload().size(), &m, &err)) {
            if (!StringsValid(m)) Fail(seed, it, "decoded a string that is not valid UTF-8");
            outcomes["ok"]++;
            if (identity) outcomes["SET_IDENTITY_ok"]++;
            if (exec_user) {
              outcomes["EXEC_USER_ok"]++;
              // The user string then goes to the spec parser as the agent does.
              UserSpec spec;
              std::string why;
              if (!ParseUserSpec(m.exec.user, &spec, &why) && why.empty()) Fail(seed, it, "user spec refused without a message");
            }
          } else {
            if (identity) outcomes["SET_IDENTITY_refused"]++;
            if (exec_user) outcomes["EXEC_USER_refused"]++;
            if (err.message.empty()) Fail(seed, it, "decode error without a message");
            if (static_cast<uint32_t>(err.code) < 1 || static_cast<uint32_t>(err.code) > 15)
              Fail(seed, it, "decode error with an unknown code");
            outcomes[ErrorCodeName(err.code)]++;
          }
        }
      }
      off += chunk;
    }
  }
  std::printf("iterations %ld frames %ld oversized %ld", iterations, frames, oversized);
  for (const auto& [k, v] : outcomes) std::printf(" %s %ld", k.c_str(), v);
  std::printf("\n");
  return 0;
}
