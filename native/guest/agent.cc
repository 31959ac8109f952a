// vmlet-agent: the guest's PID 1 and the host's hands inside the VM.
//
// One thread, one epoll loop: host connections, process stdio fds and a
// signalfd for SIGCHLD. Nothing blocks except fork/exec's error pipe (the
// child either execs or reports at once). See docs/agent-protocol.md.
//
//   vmlet-agent                          as PID 1: early mounts, vsock:1024
//   vmlet-agent --listen unix:/p --no-init   on a host, for tests
#include <fcntl.h>
#include <grp.h>
#include <pty.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>
#include <linux/random.h>
#include <linux/vm_sockets.h>
#include <sched.h>

#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "init.h"
#include "protocol.h"
#include "userdb.h"
#include "rootfs.h"

namespace vmlet::agent {
namespace {

constexpr unsigned kDefaultVsockPort = 1024;
// Above this many queued bytes towards a host the agent stops reading that
// host's requests: a host that writes but never reads cannot grow the queue
// further (process output is already bounded by per-stream credit).
constexpr size_t kOutHighWater = 1u << 20;
constexpr const char* kVersion = "vmlet-agent 0.1.0";

void Log(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::fprintf(stderr, "vmlet-agent: ");
  std::vfprintf(stderr, fmt, ap);
  std::fprintf(stderr, "\n");
  va_end(ap);
}

struct Conn;
struct Process;

struct Watch {
  enum Kind { Listener, Connection, Output, Stdin, Signals } kind;
  void* obj = nullptr;
  int stream = 0;  // Output: 0 stdout, 1 stderr
  int fd = -1;
};

struct OutStream {
  int fd = -1;
  uint32_t credit = kInitialWindow;
  bool registered = false;
  bool eof = false;
  Watch watch;
};

struct Process {
  Conn* conn = nullptr;
  uint32_t id = 0;
  pid_t pid = -1;
  bool tty = false;
  int tty_master = -1;  // for TIOCSWINSZ; the same descriptor as out[0].fd
  // The terminal's master after its output ended, kept open until the reap:
  // closing the last master descriptor hangs up the terminal, and a process
  // that has closed its fds but not finished exiting would die of SIGHUP.
  int tty_hold = -1;
  OutStream out[2];
  int stdin_fd = -1;
  Watch stdin_watch;
  bool stdin_registered = false;
  std::string stdin_buf;
  bool stdin_eof_requested = false;
  bool exited = false;
  int status = 0;
  bool gone = false;
};

struct Conn {
  int fd = -1;
  Watch watch;
  FrameDecoder decoder;
  bool hello = false;
  uint32_t version = 0;  // negotiated by HELLO
  std::deque<std::vector<uint8_t>> outq;
  size_t out_off = 0;
  size_t out_bytes = 0;
  uint32_t events = 0;
  bool closed = false;
  std::map<uint32_t, Process*> procs;
};

struct ChildSpec {
  std::vector<std::string> args, env;
  std::vector<char*> argv, envp;
  std::string path_env;
  std::string cwd, chroot_dir, hostname, pty_slave;
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;
  std::vector<Rlimit> rlimits;
  int in_fd = -1, out_fd = -1, err_fd = -1;
  int err_pipe = -1;
};

struct ChildFailure {
  int32_t stage;
  int32_t err;
};

// The agent raises its own descriptor limit (every process costs it three or
// four); processes get the limit the agent was started with, then their own.
rlimit g_inherited_nofile{};

const char* const kStages[] = {"setsid",  "open pty",  "dup2",   "setrlimit", "set hostname", "enter rootfs",
                               "chdir",   "setgroups", "setgid", "setuid",    "execve"};
constexpr int kNumStages = sizeof kStages / sizeof kStages[0];

// Makes dir the process's root in a mount namespace of its own, so nothing
// outside the rootfs (the agent's files, other containers' trees) stays
// reachable, as chroot alone would leave it. pivot_root cannot leave an
// initramfs root (EINVAL); there the root is replaced by moving the rootfs
// mount over it, which is safe because the namespace is private.
bool EnterRootfs(const std::string& dir) {
  if (unshare(CLONE_NEWNS) != 0) return false;
  if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) return false;
  if (chdir(dir.c_str()) != 0) return false;
  if (syscall(SYS_pivot_root, ".", ".") == 0) {
    // The old root is stacked on top of the new one at "/": detach it.
    if (umount2(".", MNT_DETACH) != 0) return false;
  } else {
    if (errno != EINVAL) return false;
    if (mount(".", "/", nullptr, MS_MOVE, nullptr) != 0) return false;
    if (chroot(".") != 0) return false;
  }
  return chdir("/") == 0;
}

[[noreturn]] void ChildFail(const ChildSpec& s, int stage) {
  ChildFailure f{stage, errno};
  ssize_t rc = write(s.err_pipe, &f, sizeof f);
  (void)rc;
  _exit(127);
}

// Runs in the forked child: only async-signal-safe calls plus the memory the
// parent prepared (the agent is single-threaded, so that memory is sound).
[[noreturn]] void ChildExec(ChildSpec& s) {
  sigset_t all;
  sigemptyset(&all);
  sigprocmask(SIG_SETMASK, &all, nullptr);
  // Ignored dispositions survive exec; the agent ignores SIGPIPE.
  for (int sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL);
  if (setsid() < 0) ChildFail(s, 0);
  if (!s.pty_slave.empty()) {
    int fd = open(s.pty_slave.c_str(), O_RDWR);
    if (fd < 0 || ioctl(fd, TIOCSCTTY, 0) != 0) ChildFail(s, 1);
    s.in_fd = s.out_fd = s.err_fd = fd;
  }
  if (dup2(s.in_fd, 0) < 0 || dup2(s.out_fd, 1) < 0 || dup2(s.err_fd, 2) < 0) ChildFail(s, 2);
  // Every agent descriptor is O_CLOEXEC; this also catches any that is not.
  syscall(SYS_close_range, 3u, ~0u, 4u /* CLOSE_RANGE_CLOEXEC */);
  if (setrlimit(RLIMIT_NOFILE, &g_inherited_nofile) != 0) ChildFail(s, 3);
  for (const Rlimit& l : s.rlimits) {
    rlimit r{static_cast<rlim_t>(l.soft), static_cast<rlim_t>(l.hard)};
    if (setrlimit(static_cast<__rlimit_resource>(l.resource), &r) != 0) ChildFail(s, 3);
  }
  if (!s.hostname.empty()) {
    if (unshare(CLONE_NEWUTS) != 0 || sethostname(s.hostname.data(), s.hostname.size()) != 0) ChildFail(s, 4);
  }
  if (!s.chroot_dir.empty() && !EnterRootfs(s.chroot_dir)) ChildFail(s, 5);
  // An empty cwd is the root, not whatever directory the agent happens to be in.
  if (chdir(s.cwd.empty() ? "/" : s.cwd.c_str()) != 0) ChildFail(s, 6);
  if (geteuid() == 0) {
    if (setgroups(s.groups.size(), s.groups.data()) != 0) ChildFail(s, 7);
  }
  if (getegid() != s.gid && setgid(s.gid) != 0) ChildFail(s, 8);
  if (geteuid() != s.uid && setuid(s.uid) != 0) ChildFail(s, 9);
  const char* file = s.argv[0];
  if (std::strchr(file, '/')) {
    execve(file, s.argv.data(), s.envp.data());
    ChildFail(s, 10);
  }
  // PATH comes from the process's own environment, not the agent's.
  int saved = ENOENT;
  const std::string& path = s.path_env;
  size_t start = 0;
  char buf[4096];
  while (start <= path.size()) {
    size_t colon = path.find(':', start);
    size_t len = (colon == std::string::npos ? path.size() : colon) - start;
    size_t flen = std::strlen(file);
    if (len + 1 + flen + 1 <= sizeof buf) {
      std::memcpy(buf, path.data() + start, len);
      size_t off = len;
      if (len == 0) buf[off++] = '.';
      buf[off++] = '/';
      std::memcpy(buf + off, file, flen + 1);
      execve(buf, s.argv.data(), s.envp.data());
      if (errno != ENOENT && errno != ENOTDIR) saved = errno;
    }
    if (colon == std::string::npos) break;
    start = colon + 1;
  }
  errno = saved;
  ChildFail(s, 10);
}

class Agent {
 public:
  Agent(bool init_mode, std::string state_dir) : init_mode_(init_mode), state_dir_(std::move(state_dir)) {}
  bool Setup();
  bool Listen(const std::string& spec);
  bool StackFromCmdline(const std::vector<std::string>& layers);
  void Run();

 private:
  void Register(int fd, Watch* w, uint32_t events);
  void Modify(int fd, Watch* w, uint32_t events);
  void Unregister(int fd);
  void Accept(Watch* w);
  void ConnReadable(Conn* c);
  void ConnWritable(Conn* c);
  void UpdateConnEvents(Conn* c);
  void CloseConn(Conn* c);
  void Send(Conn* c, std::vector<uint8_t> frame);
  void SendError(Conn* c, uint32_t id, ErrorCode code, const std::string& msg) {
    Send(c, ErrorFrame(id, code, msg));
  }
  void SendOk(Conn* c, uint32_t id, const std::vector<uint8_t>& payload = {}) {
    Send(c, Frame(MsgType::Ok, id, payload));
  }
  void HandleFrame(Conn* c, const FrameHeader& h, const std::vector<uint8_t>& payload);
  void HandleHello(Conn* c, const HostMessage& m);
  void HandleExec(Conn* c, const HostMessage& m);
  void HandleMount(Conn* c, const HostMessage& m);
  void HandleSetIdentity(Conn* c, const HostMessage& m);
  void HandleStdin(Conn* c, Process* p, const HostMessage& m);
  Process* FindProcess(Conn* c, uint32_t id, uint32_t reply_id);
  void OutputReadable(Process* p, int stream);
  void SetOutputRegistered(Process* p, int stream, bool on);
  void StdinWritable(Process* p);
  void FlushStdin(Process* p);
  void CloseStdin(Process* p);
  void Reap();
  void MaybeFinish(Process* p);
  void DropProcess(Process* p);

  bool init_mode_;
  std::string state_dir_;
  int epfd_ = -1;
  int sigfd_ = -1;
  Watch sig_watch_{Watch::Signals};
  std::vector<std::unique_ptr<Watch>> listeners_;
  std::vector<std::unique_ptr<Conn>> conns_;
  std::vector<std::unique_ptr<Process>> procs_;
  std::map<pid_t, Process*> by_pid_;
  std::map<std::string, std::string> rootfs_;  // name -> merged directory
};

void Agent::Register(int fd, Watch* w, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.ptr = w;
  w->fd = fd;
  if (epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev) != 0) Log("epoll add fd %d: %s", fd, std::strerror(errno));
}

void Agent::Modify(int fd, Watch* w, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.ptr = w;
  if (epoll_ctl(epfd_, EPOLL_CTL_MOD, fd, &ev) != 0) Log("epoll mod fd %d: %s", fd, std::strerror(errno));
}

void Agent::Unregister(int fd) { epoll_ctl(epfd_, EPOLL_CTL_DEL, fd, nullptr); }

bool Agent::Setup() {
  signal(SIGPIPE, SIG_IGN);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGCHLD);
  sigprocmask(SIG_BLOCK, &set, nullptr);
  sigfd_ = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
  epfd_ = epoll_create1(EPOLL_CLOEXEC);
  if (sigfd_ < 0 || epfd_ < 0) {
    Log("signalfd/epoll: %s", std::strerror(errno));
    return false;
  }
  sig_watch_.kind = Watch::Signals;
  Register(sigfd_, &sig_watch_, EPOLLIN);
  if (!init_mode_) {
    // Orphans of the processes we start come to us to be reaped, as they would to PID 1.
    prctl(PR_SET_CHILD_SUBREAPER, 1);
  }
  return true;
}

bool ValidListenSpec(const std::string& spec) {
  if (spec.rfind("unix:", 0) == 0) return spec.size() > 5 && spec.size() - 5 < sizeof(sockaddr_un::sun_path);
  if (spec.rfind("vsock:", 0) == 0)
    return spec.size() > 6 && spec.size() <= 16 && spec.find_first_not_of("0123456789", 6) == std::string::npos;
  return false;
}

bool Agent::Listen(const std::string& spec) {
  int fd = -1;
  int rc = -1;
  if (spec.rfind("unix:", 0) == 0) {
    std::string path = spec.substr(5);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::memcpy(sa.sun_path, path.c_str(), path.size() + 1);
    struct stat st;
    if (lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) unlink(path.c_str());
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd >= 0) rc = bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa);
  } else {
    sockaddr_vm sa{};
    sa.svm_family = AF_VSOCK;
    sa.svm_cid = VMADDR_CID_ANY;
    sa.svm_port = static_cast<unsigned>(std::strtoul(spec.c_str() + 6, nullptr, 10));
    fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd >= 0) rc = bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa);
  }
  if (rc == 0) rc = listen(fd, 64);
  if (rc != 0) {
    Log("listen %s: %s", spec.c_str(), std::strerror(errno));
    if (fd >= 0) close(fd);
    return false;
  }
  auto w = std::make_unique<Watch>();
  w->kind = Watch::Listener;
  Register(fd, w.get(), EPOLLIN);
  listeners_.push_back(std::move(w));
  Log("listening on %s", spec.c_str());
  return true;
}

bool Agent::StackFromCmdline(const std::vector<std::string>& layers) {
  // Block devices are created in devtmpfs as their drivers probe; give a
  // late one a few seconds before calling the layer missing.
  for (const std::string& layer : layers) {
    struct stat st;
    for (int i = 0; i < 50 && stat(layer.c_str(), &st) != 0; i++) usleep(100 * 1000);
  }
  StackedRootfs out;
  std::string err;
  if (!StackRootfs(state_dir_, "rootfs", layers, "tmpfs", &out, &err)) {
    Log("rootfs from the kernel command line: %s", err.c_str());
    return false;
  }
  rootfs_["rootfs"] = out.merged;
  return true;
}

void Agent::Run() {
  epoll_event evs[64];
  for (;;) {
    int n = epoll_wait(epfd_, evs, 64, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      Log("epoll_wait: %s", std::strerror(errno));
      continue;
    }
    for (int i = 0; i < n; i++) {
      Watch* w = static_cast<Watch*>(evs[i].data.ptr);
      uint32_t e = evs[i].events;
      switch (w->kind) {
        case Watch::Listener: Accept(w); break;
        case Watch::Signals: Reap(); break;
        case Watch::Connection: {
          Conn* c = static_cast<Conn*>(w->obj);
          if (c->closed) break;
          if (e & EPOLLOUT) ConnWritable(c);
          if (!c->closed && (e & (EPOLLIN | EPOLLHUP | EPOLLERR))) ConnReadable(c);
          break;
        }
        case Watch::Output: {
          Process* p = static_cast<Process*>(w->obj);
          if (!p->gone) OutputReadable(p, w->stream);
          break;
        }
        case Watch::Stdin: {
          Process* p = static_cast<Process*>(w->obj);
          if (!p->gone) StdinWritable(p);
          break;
        }
      }
    }
    // Objects are freed only between batches: a later event in the same
    // batch may still point at them.
    for (size_t i = 0; i < conns_.size();) {
      if (conns_[i]->closed) conns_.erase(conns_.begin() + static_cast<long>(i));
      else i++;
    }
    for (size_t i = 0; i < procs_.size();) {
      if (procs_[i]->gone) procs_.erase(procs_.begin() + static_cast<long>(i));
      else i++;
    }
  }
}

void Agent::Accept(Watch* w) {
  for (;;) {
    int fd = accept4(w->fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno != EAGAIN && errno != EINTR) Log("accept: %s", std::strerror(errno));
      return;
    }
    auto c = std::make_unique<Conn>();
    c->fd = fd;
    c->watch.kind = Watch::Connection;
    c->watch.obj = c.get();
    c->events = EPOLLIN;
    Register(fd, &c->watch, EPOLLIN);
    conns_.push_back(std::move(c));
  }
}

void Agent::UpdateConnEvents(Conn* c) {
  if (c->closed) return;
  uint32_t ev = 0;
  if (c->out_bytes < kOutHighWater) ev |= EPOLLIN;
  if (c->out_bytes > 0) ev |= EPOLLOUT;
  if (ev != c->events) {
    c->events = ev;
    Modify(c->fd, &c->watch, ev);
  }
}

void Agent::Send(Conn* c, std::vector<uint8_t> frame) {
  if (c == nullptr || c->closed) return;
  size_t off = 0;
  if (c->outq.empty()) {
    while (off < frame.size()) {
      ssize_t n = write(c->fd, frame.data() + off, frame.size() - off);
      if (n > 0) {
        off += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) break;
      CloseConn(c);
      return;
    }
    if (off == frame.size()) return;
  }
  c->out_bytes += frame.size() - off;
  if (off > 0) frame.erase(frame.begin(), frame.begin() + static_cast<long>(off));
  c->outq.push_back(std::move(frame));
  UpdateConnEvents(c);
}

void Agent::ConnWritable(Conn* c) {
  while (!c->outq.empty()) {
    std::vector<uint8_t>& f = c->outq.front();
    ssize_t n = write(c->fd, f.data() + c->out_off, f.size() - c->out_off);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) break;
      CloseConn(c);
      return;
    }
    c->out_off += static_cast<size_t>(n);
    c->out_bytes -= static_cast<size_t>(n);
    if (c->out_off == f.size()) {
      c->outq.pop_front();
      c->out_off = 0;
    }
  }
  UpdateConnEvents(c);
}

void Agent::ConnReadable(Conn* c) {
  uint8_t buf[64 * 1024];
  ssize_t n = read(c->fd, buf, sizeof buf);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n <= 0) {
    if (c->decoder.mid_frame()) Log("host closed the connection inside a frame (truncated frame dropped)");
    CloseConn(c);
    return;
  }
  size_t used = 0;
  while (used < static_cast<size_t>(n) && !c->closed) {
    used += c->decoder.Feed(buf + used, static_cast<size_t>(n) - used);
    switch (c->decoder.Next()) {
      case FrameDecoder::Event::Frame: HandleFrame(c, c->decoder.header(), c->decoder.payload()); break;
      case FrameDecoder::Event::Oversized:
        SendError(c, c->decoder.header().id, ErrorCode::FrameTooLarge,
                  "frame payload of " + std::to_string(c->decoder.header().length) + " bytes exceeds the " +
                      std::to_string(kMaxPayload) + "-byte limit; the payload is skipped");
        break;
      case FrameDecoder::Event::None: break;
    }
  }
}

void Agent::CloseConn(Conn* c) {
  if (c->closed) return;
  c->closed = true;
  Unregister(c->fd);
  close(c->fd);
  c->outq.clear();
  // Version 1 ties a process to the connection that started it: without a
  // host to report to, it is killed (and reaped when it dies).
  for (auto& [id, p] : c->procs) {
    p->conn = nullptr;
    if (!p->exited) kill(p->pid, SIGKILL);
    for (int s = 0; s < 2; s++) {
      if (p->out[s].fd >= 0) {
        if (p->out[s].registered) Unregister(p->out[s].fd);
        close(p->out[s].fd);
        p->out[s].fd = -1;
        p->out[s].registered = false;
      }
      p->out[s].eof = true;
    }
    CloseStdin(p);
    if (p->tty_hold >= 0) {
      close(p->tty_hold);
      p->tty_hold = -1;
    }
    if (p->exited) p->gone = true;
  }
  c->procs.clear();
}

Process* Agent::FindProcess(Conn* c, uint32_t id, uint32_t reply_id) {
  auto it = c->procs.find(id);
  if (it == c->procs.end()) {
    SendError(c, reply_id, ErrorCode::NoSuchProcess,
                "no process with id " + std::to_string(id) + " on this connection (never started, or its EXIT was sent)");
    return nullptr;
  }
  return it->second;
}

void Agent::HandleFrame(Conn* c, const FrameHeader& h, const std::vector<uint8_t>& payload) {
  HostMessage m;
  DecodeError err;
  // Before HELLO nothing is served; decode as the newest version so the
  // reply is NO_HELLO rather than a layout complaint.
  if (!DecodeHostMessage(h, payload.data(), payload.size(), &m, &err, c->hello ? c->version : kProtocolVersion)) {
    SendError(c, h.id, err.code, err.message);
    return;
  }
  MsgType t = static_cast<MsgType>(h.type);
  if (!c->hello && t != MsgType::Hello) {
    SendError(c, h.id, ErrorCode::NoHello, "send HELLO first: no request is served before the version handshake");
    return;
  }
  switch (t) {
    case MsgType::Hello: HandleHello(c, m); return;
    case MsgType::Ping: Send(c, Frame(MsgType::Pong, h.id, {})); return;
    case MsgType::SetClock: {
      if (!init_mode_) {
        SendError(c, h.id, ErrorCode::Unsupported,
                  "SET_CLOCK is refused outside a guest: this agent is not PID 1 (--no-init), it would set the host's clock");
        return;
      }
      if (m.clock.nsec >= 1000000000u) {
        SendError(c, h.id, ErrorCode::BadRequest, "SET_CLOCK nsec must be below 1e9");
        return;
      }
      timespec ts{static_cast<time_t>(m.clock.sec), static_cast<long>(m.clock.nsec)};
      if (clock_settime(CLOCK_REALTIME, &ts) != 0) {
        SendError(c, h.id, ErrorCode::Internal, std::string("clock_settime: ") + std::strerror(errno));
        return;
      }
      SendOk(c, h.id);
      return;
    }
    case MsgType::MountRootfs: HandleMount(c, m); return;
    case MsgType::Exec: HandleExec(c, m); return;
    case MsgType::SetIdentity:
      // A version adds types and changes nothing else: a host that agreed on
      // version 1 gets what version 1 says of an unknown type.
      if (c->version < 2) {
        SendError(c, h.id, ErrorCode::UnknownType,
                  "SET_IDENTITY (0x0b) is a protocol version 2 message; this connection agreed on version " +
                      std::to_string(c->version) + " in HELLO");
        return;
      }
      HandleSetIdentity(c, m);
      return;
    default: break;
  }
  // SIGNAL and RESIZE are requests with their own id and name the process in
  // the payload; stream messages are addressed by the process id itself.
  bool by_payload = t == MsgType::Signal || t == MsgType::Resize;
  Process* p = FindProcess(c, by_payload ? m.process : h.id, h.id);
  if (!p) return;
  switch (t) {
    case MsgType::Stdin: HandleStdin(c, p, m); return;
    case MsgType::StdinEof:
      if (p->stdin_eof_requested) return;
      p->stdin_eof_requested = true;
      FlushStdin(p);
      return;
    case MsgType::Signal:
      if (m.signal < 1 || m.signal >= static_cast<uint32_t>(NSIG)) {
        SendError(c, h.id, ErrorCode::BadRequest, "signal " + std::to_string(m.signal) + " is not in 1.." + std::to_string(NSIG - 1));
        return;
      }
      // After the reap the pid may belong to someone else: never signal it.
      if (p->exited) {
        SendError(c, h.id, ErrorCode::NoSuchProcess, "process " + std::to_string(p->id) + " has already exited");
        return;
      }
      if (kill(p->pid, static_cast<int>(m.signal)) != 0) {
        SendError(c, h.id, ErrorCode::Internal, std::string("kill: ") + std::strerror(errno));
        return;
      }
      SendOk(c, h.id);
      return;
    case MsgType::Resize: {
      if (!p->tty) {
        SendError(c, h.id, ErrorCode::BadRequest, "RESIZE needs a process started with a terminal (EXEC flag TTY)");
        return;
      }
      winsize ws{m.rows, m.cols, 0, 0};
      if (p->tty_master < 0 || ioctl(p->tty_master, TIOCSWINSZ, &ws) != 0) {
        SendError(c, h.id, ErrorCode::NoSuchProcess, "the process's terminal is closed");
        return;
      }
      SendOk(c, h.id);
      return;
    }
    case MsgType::OutputWindow: {
      if (m.stream != 1 && m.stream != 2) {
        SendError(c, h.id, ErrorCode::BadRequest, "OUTPUT_WINDOW stream must be 1 (stdout) or 2 (stderr)");
        return;
      }
      OutStream& o = p->out[m.stream - 1];
      if (static_cast<uint64_t>(o.credit) + m.credit > (1u << 30)) {
        SendError(c, h.id, ErrorCode::FlowControl, "OUTPUT_WINDOW would raise the credit above 1 GiB");
        return;
      }
      o.credit += m.credit;
      if (o.fd >= 0 && o.credit > 0 && !o.registered) SetOutputRegistered(p, m.stream - 1, true);
      return;
    }
    default:
      SendError(c, h.id, ErrorCode::UnknownType, "message type is agent-to-host only");
      return;
  }
}

void Agent::HandleHello(Conn* c, const HostMessage& m) {
  const HelloReq& r = m.hello;
  if (r.min_version > r.max_version) {
    SendError(c, m.header.id, ErrorCode::BadRequest, "HELLO min_version is above max_version");
    return;
  }
  if (r.max_version < kMinProtocolVersion || r.min_version > kProtocolVersion) {
    SendError(c, m.header.id, ErrorCode::VersionUnsupported,
              "this agent speaks protocol versions " + std::to_string(kMinProtocolVersion) + ".." +
                  std::to_string(kProtocolVersion) + "; the host offered " + std::to_string(r.min_version) + ".." +
                  std::to_string(r.max_version));
    return;
  }
  c->hello = true;
  c->version = std::min(kProtocolVersion, r.max_version);
  PayloadWriter w;
  w.U32(c->version);
  w.U32(kMaxPayload);
  w.U32(kMaxDataChunk);
  w.U32(kInitialWindow);
  w.U32(init_mode_ ? 1 : 0);
  w.Str(kVersion);
  Send(c, Frame(MsgType::HelloOk, m.header.id, w.buf()));
}

// A guest restored from a template shares its siblings' RNG state, wall clock
// (frozen at snapshot time, then advanced by kvmclock) and hostname. Steps, in
// this order: the clock first (the host stamped it just before sending, every
// later microsecond is error), then entropy, then the hostname. Everything is
// validated before the first step; a failing step stops the rest and is named.
void Agent::HandleSetIdentity(Conn* c, const HostMessage& m) {
  const SetIdentityReq& r = m.identity;
  uint32_t id = m.header.id;
  auto bad = [&](const std::string& msg) { SendError(c, id, ErrorCode::BadRequest, msg); };
  if (r.flags & ~kIdentityKnownFlags)
    return bad("SET_IDENTITY flags has unknown bits set (known: 1 clock, 2 hostname)");
  if (r.entropy.size() < kMinIdentityEntropy || r.entropy.size() > kMaxIdentityEntropy)
    return bad("SET_IDENTITY entropy is " + std::to_string(r.entropy.size()) + " bytes; send " +
               std::to_string(kMinIdentityEntropy) + ".." + std::to_string(kMaxIdentityEntropy) +
               " bytes from the host's own CSPRNG");
  bool set_clock = r.flags & kIdentityClock;
  bool set_hostname = r.flags & kIdentityHostname;
  if (set_clock && r.realtime_ns <= 0)
    return bad("SET_IDENTITY realtime_ns must be positive (ns since the epoch), got " + std::to_string(r.realtime_ns));
  if (!set_clock && r.realtime_ns != 0) return bad("SET_IDENTITY realtime_ns is set but the clock flag (1) is not");
  if (set_hostname && (r.hostname.empty() || r.hostname.size() > kMaxHostname))
    return bad("SET_IDENTITY hostname is " + std::to_string(r.hostname.size()) + " bytes; it must be 1.." +
               std::to_string(kMaxHostname));
  if (!set_hostname && !r.hostname.empty()) return bad("SET_IDENTITY hostname is set but the hostname flag (2) is not");
  if (set_clock && !init_mode_) {
    SendError(c, id, ErrorCode::Unsupported,
              "SET_IDENTITY with the clock flag is refused outside a guest: this agent is not PID 1 (--no-init), it "
              "would set the host's clock; send it without flag 1");
    return;
  }
  auto failed = [&](const char* step) {
    SendError(c, id, ErrorCode::IdentityFailed,
              std::string("SET_IDENTITY failed at ") + step + ": " + std::strerror(errno) + "; later steps not applied");
  };
  timespec before{};
  clock_gettime(CLOCK_REALTIME, &before);
  if (set_clock) {
    timespec ts{static_cast<time_t>(r.realtime_ns / 1000000000), static_cast<long>(r.realtime_ns % 1000000000)};
    if (clock_settime(CLOCK_REALTIME, &ts) != 0) return failed("clock_settime(CLOCK_REALTIME)");
  }
  {
    // RNDADDENTROPY mixes the bytes into the input pool and credits them, but
    // a CRNG that is already seeded (every restored guest's is) only draws on
    // the pool at its next periodic reseed: RNDRESEEDCRNG makes it now, and
    // bumps the generation so every per-CPU CRNG re-keys on its next use.
    // (vmgenid would do the same from the kernel, add_vmfork_randomness, but
    // it is an ACPI device and these guests have no ACPI.)
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return failed("open /dev/urandom");
    std::vector<uint8_t> info(sizeof(rand_pool_info) + r.entropy.size());
    rand_pool_info hdr{};
    hdr.entropy_count = static_cast<int>(r.entropy.size() * 8);
    hdr.buf_size = static_cast<int>(r.entropy.size());
    std::memcpy(info.data(), &hdr, sizeof hdr);
    std::memcpy(info.data() + sizeof hdr, r.entropy.data(), r.entropy.size());
    int rc = ioctl(fd, RNDADDENTROPY, info.data());
    int saved = errno;
    // Part of the seed of this guest's CRNG: wipe this copy (the decoder's
    // frame buffer keeps one until the next frame overwrites it).
    explicit_bzero(info.data(), info.size());
    if (rc != 0) {
      close(fd);
      errno = saved;
      return failed("ioctl RNDADDENTROPY on /dev/urandom");
    }
    if (ioctl(fd, RNDRESEEDCRNG) != 0) {
      saved = errno;
      close(fd);
      errno = saved;
      return failed("ioctl RNDRESEEDCRNG on /dev/urandom");
    }
    close(fd);
  }
  if (set_hostname && sethostname(r.hostname.data(), r.hostname.size()) != 0) return failed("sethostname");
  PayloadWriter w;
  w.U64(static_cast<uint64_t>(static_cast<int64_t>(before.tv_sec) * 1000000000 + before.tv_nsec));
  SendOk(c, id, w.buf());
}

void Agent::HandleMount(Conn* c, const HostMessage& m) {
  const MountRootfsReq& r = m.mount;
  if (rootfs_.count(r.name)) {
    SendError(c, m.header.id, ErrorCode::BadRequest, "rootfs '" + r.name + "' is already mounted at " + rootfs_[r.name]);
    return;
  }
  StackedRootfs out;
  std::string err;
  if (!StackRootfs(state_dir_, r.name, r.layers, r.upper, &out, &err)) {
    SendError(c, m.header.id, ErrorCode::MountFailed, err);
    return;
  }
  rootfs_[r.name] = out.merged;
  PayloadWriter w;
  w.Str(out.merged);
  SendOk(c, m.header.id, w.buf());
}

void Agent::HandleExec(Conn* c, const HostMessage& m) {
  const ExecReq& r = m.exec;
  uint32_t id = m.header.id;
  auto bad = [&](const std::string& msg) { SendError(c, id, ErrorCode::BadRequest, msg); };
  if (id == 0) return bad("EXEC needs a non-zero request id: it becomes the process id of its streams");
  if (c->procs.count(id)) return bad("process id " + std::to_string(id) + " is still in use on this connection");
  if (r.args.empty()) return bad("EXEC args is empty: give at least the program to run");
  if (r.flags & ~ExecKnownFlags(c->version))
    return bad(c->version >= 3 ? "EXEC flags has unknown bits set (known: 1 tty, 2 user)"
                               : "EXEC flags has unknown bits set (known in protocol version " +
                                     std::to_string(c->version) + ": 1 tty; 2 user needs version 3)");
  bool by_name = r.flags & kExecUser;
  UserSpec spec;
  if (by_name) {
    if (r.uid != 0 || r.gid != 0 || !r.groups.empty())
      return bad("EXEC with the user flag takes uid, gid and groups from the user string: send them as 0 and empty");
    std::string why;
    if (!ParseUserSpec(r.user, &spec, &why)) return bad(why);
  }
  if (!r.cwd.empty() && r.cwd[0] != '/') return bad("EXEC cwd '" + r.cwd + "' must be an absolute path");
  if (r.hostname.size() > 64) return bad("EXEC hostname is longer than 64 bytes");
  for (const Rlimit& l : r.rlimits) {
    if (l.resource >= RLIM_NLIMITS) return bad("rlimit resource " + std::to_string(l.resource) + " is unknown");
    if (l.soft > l.hard) return bad("rlimit " + std::to_string(l.resource) + " soft limit is above its hard limit");
  }
  for (const std::string& e : r.env)
    if (e.find('=') == std::string::npos) return bad("env entry '" + e + "' has no '='");
  ChildSpec s;
  if (!r.rootfs.empty()) {
    auto it = rootfs_.find(r.rootfs);
    if (it == rootfs_.end()) return bad("rootfs '" + r.rootfs + "' is not mounted: send MOUNT_ROOTFS first");
    s.chroot_dir = it->second;
  }
  s.args = r.args;
  s.env = r.env;
  s.path_env = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
  for (const std::string& e : s.env)
    if (e.rfind("PATH=", 0) == 0) s.path_env = e.substr(5);
  for (std::string& a : s.args) s.argv.push_back(a.data());
  s.argv.push_back(nullptr);
  for (std::string& e : s.env) s.envp.push_back(e.data());
  s.envp.push_back(nullptr);
  s.cwd = r.cwd;
  s.hostname = r.hostname;
  s.uid = r.uid;
  s.gid = r.gid;
  s.groups.assign(r.groups.begin(), r.groups.end());
  s.rlimits = r.rlimits;
  if (by_name) {
    // Resolved here, before the fork, against the rootfs the process will
    // get (the container's files, not the agent's), so an unknown name is a
    // reply of its own and no process is started.
    std::string where = r.rootfs.empty() ? "the agent's root" : "rootfs '" + r.rootfs + "'";
    int root_fd = open(s.chroot_dir.empty() ? "/" : s.chroot_dir.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root_fd < 0) {
      SendError(c, id, ErrorCode::ExecFailed, "resolving user '" + r.user + "': opening " + where + ": " + std::strerror(errno));
      return;
    }
    ExecUser u;
    ResolveError rerr;
    bool resolved = ResolveExecUser(root_fd, spec, where, &u, &rerr);
    close(root_fd);
    if (!resolved) {
      SendError(c, id, rerr.unknown ? ErrorCode::UnknownUser : ErrorCode::ExecFailed, rerr.message);
      return;
    }
    s.uid = u.uid;
    s.gid = u.gid;
    s.groups.assign(u.groups.begin(), u.groups.end());
    // Docker and runc give HOME from passwd when the request has none.
    bool has_home = false;
    for (const std::string& e : s.env)
      if (e.rfind("HOME=", 0) == 0) has_home = true;
    if (!has_home) {
      s.env.push_back("HOME=" + u.home);
      // The push may have moved every string: envp is rebuilt over them.
      s.envp.clear();
      for (std::string& e : s.env) s.envp.push_back(e.data());
      s.envp.push_back(nullptr);
    }
  }

  bool tty = r.flags & kExecTty;
  int parent_fds[3] = {-1, -1, -1};  // stdin (write end), stdout, stderr (read ends)
  int child_fds[3] = {-1, -1, -1};
  auto close_all = [&]() {
    for (int i = 0; i < 3; i++) {
      if (parent_fds[i] >= 0) close(parent_fds[i]);
      if (child_fds[i] >= 0) close(child_fds[i]);
    }
  };
  if (tty) {
    int master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
    if (master < 0 || grantpt(master) != 0 || unlockpt(master) != 0) {
      SendError(c, id, ErrorCode::ExecFailed, std::string("allocating a pty: ") + std::strerror(errno));
      if (master >= 0) close(master);
      return;
    }
    char name[128];
    if (ptsname_r(master, name, sizeof name) != 0) {
      SendError(c, id, ErrorCode::ExecFailed, std::string("ptsname: ") + std::strerror(errno));
      close(master);
      return;
    }
    s.pty_slave = name;
    winsize ws{r.rows ? r.rows : static_cast<uint16_t>(24), r.cols ? r.cols : static_cast<uint16_t>(80), 0, 0};
    ioctl(master, TIOCSWINSZ, &ws);
    parent_fds[1] = master;
    parent_fds[0] = fcntl(master, F_DUPFD_CLOEXEC, 3);
  } else {
    for (int i = 0; i < 3; i++) {
      int p[2];
      if (pipe2(p, O_CLOEXEC) != 0) {
        SendError(c, id, ErrorCode::ExecFailed, std::string("pipe: ") + std::strerror(errno));
        close_all();
        return;
      }
      // stdin: the child reads p[0]; stdout/stderr: the child writes p[1].
      parent_fds[i] = i == 0 ? p[1] : p[0];
      child_fds[i] = i == 0 ? p[0] : p[1];
      fcntl(parent_fds[i], F_SETFL, O_NONBLOCK);
    }
    s.in_fd = child_fds[0];
    s.out_fd = child_fds[1];
    s.err_fd = child_fds[2];
  }
  int errp[2];
  if (pipe2(errp, O_CLOEXEC) != 0) {
    SendError(c, id, ErrorCode::ExecFailed, std::string("pipe: ") + std::strerror(errno));
    close_all();
    return;
  }
  s.err_pipe = errp[1];
  pid_t pid = fork();
  if (pid < 0) {
    SendError(c, id, ErrorCode::ExecFailed, std::string("fork: ") + std::strerror(errno));
    close(errp[0]);
    close(errp[1]);
    close_all();
    return;
  }
  if (pid == 0) ChildExec(s);
  close(errp[1]);
  for (int i = 0; i < 3; i++) {
    if (child_fds[i] >= 0) close(child_fds[i]);
    child_fds[i] = -1;
  }
  ChildFailure f{};
  ssize_t got;
  do got = read(errp[0], &f, sizeof f);
  while (got < 0 && errno == EINTR);
  close(errp[0]);
  if (got == static_cast<ssize_t>(sizeof f)) {
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR) {
    }
    close_all();
    const char* stage = f.stage >= 0 && f.stage < kNumStages ? kStages[f.stage] : "setup";
    SendError(c, id, ErrorCode::ExecFailed,
              "starting '" + r.args[0] + "' failed at " + stage + ": " + std::strerror(f.err));
    return;
  }
  auto proc = std::make_unique<Process>();
  Process* p = proc.get();
  p->conn = c;
  p->id = id;
  p->pid = pid;
  p->tty = tty;
  p->stdin_fd = parent_fds[0];
  p->stdin_watch.kind = Watch::Stdin;
  p->stdin_watch.obj = p;
  for (int st = 0; st < 2; st++) {
    OutStream& o = p->out[st];
    o.fd = parent_fds[st + 1];
    o.watch.kind = Watch::Output;
    o.watch.obj = p;
    o.watch.stream = st;
    if (o.fd < 0) o.eof = true;  // a terminal has one output stream
  }
  if (tty) p->tty_master = parent_fds[1];
  c->procs[id] = p;
  by_pid_[pid] = p;
  procs_.push_back(std::move(proc));
  PayloadWriter w;
  w.U32(static_cast<uint32_t>(pid));
  Send(c, Frame(MsgType::Started, id, w.buf()));
  for (int st = 0; st < 2; st++)
    if (p->out[st].fd >= 0) SetOutputRegistered(p, st, true);
}

void Agent::SetOutputRegistered(Process* p, int stream, bool on) {
  OutStream& o = p->out[stream];
  if (o.registered == on || o.fd < 0) return;
  if (on) Register(o.fd, &o.watch, EPOLLIN);
  else Unregister(o.fd);
  o.registered = on;
}

void Agent::OutputReadable(Process* p, int stream) {
  OutStream& o = p->out[stream];
  if (o.fd < 0) return;
  if (o.credit == 0) {
    SetOutputRegistered(p, stream, false);
    return;
  }
  size_t want = std::min<size_t>(o.credit, kMaxDataChunk);
  // The frame is built around the read buffer: bulk output is copied once,
  // from the pipe into the frame, and never again before the socket.
  std::vector<uint8_t> frame(kHeaderSize + 1 + want);
  frame[kHeaderSize] = static_cast<uint8_t>(stream + 1);
  ssize_t n = read(o.fd, frame.data() + kHeaderSize + 1, want);
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
  if (n > 0) {
    frame.resize(kHeaderSize + 1 + static_cast<size_t>(n));
    FrameHeader h;
    h.length = static_cast<uint32_t>(1 + n);
    h.type = static_cast<uint16_t>(MsgType::Output);
    h.id = p->id;
    EncodeHeader(frame.data(), h);
    o.credit -= static_cast<uint32_t>(n);
    Send(p->conn, std::move(frame));
    if (o.credit == 0) SetOutputRegistered(p, stream, false);
    return;
  }
  // 0 is EOF on a pipe; a terminal's master reports EIO once every slave
  // descriptor is closed. Either way the stream is finished: say so once.
  SetOutputRegistered(p, stream, false);
  if (p->tty_master == o.fd) {
    p->tty_master = -1;
    if (p->exited) close(o.fd);
    else p->tty_hold = o.fd;
  } else {
    close(o.fd);
  }
  o.fd = -1;
  o.eof = true;
  std::vector<uint8_t> eof{static_cast<uint8_t>(stream + 1)};
  Send(p->conn, Frame(MsgType::OutputEof, p->id, eof));
  MaybeFinish(p);
}

void Agent::HandleStdin(Conn* c, Process* p, const HostMessage& m) {
  if (p->stdin_eof_requested) {
    SendError(c, p->id, ErrorCode::BadRequest, "STDIN after STDIN_EOF for process " + std::to_string(p->id));
    return;
  }
  if (p->stdin_fd < 0) {
    // The process closed its stdin or exited: the bytes have nowhere to go.
    // Hand the credit back so the host does not stall waiting for it.
    PayloadWriter w;
    w.U32(static_cast<uint32_t>(m.data.size()));
    Send(c, Frame(MsgType::StdinWindow, p->id, w.buf()));
    return;
  }
  if (p->stdin_buf.size() + m.data.size() > kInitialWindow) {
    SendError(c, p->id, ErrorCode::FlowControl,
              "STDIN of " + std::to_string(m.data.size()) + " bytes exceeds the granted window; the bytes are dropped");
    return;
  }
  p->stdin_buf.append(reinterpret_cast<const char*>(m.data.data()), m.data.size());
  FlushStdin(p);
}

void Agent::FlushStdin(Process* p) {
  if (p->stdin_fd < 0) return;
  size_t written = 0;
  while (written < p->stdin_buf.size()) {
    ssize_t n = write(p->stdin_fd, p->stdin_buf.data() + written, p->stdin_buf.size() - written);
    if (n > 0) {
      written += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) break;
    // EPIPE: the process closed its stdin; everything pending is moot.
    written = p->stdin_buf.size();
    CloseStdin(p);
    break;
  }
  if (written > 0) {
    p->stdin_buf.erase(0, written);
    PayloadWriter w;
    w.U32(static_cast<uint32_t>(written));
    Send(p->conn, Frame(MsgType::StdinWindow, p->id, w.buf()));
  }
  if (p->stdin_fd < 0) return;
  if (p->stdin_buf.empty() && p->stdin_eof_requested) {
    if (p->tty) {
      // A terminal has no stdin of its own to close: EOF is the line
      // discipline's VEOF character (in canonical mode).
      termios t;
      char veof = tcgetattr(p->stdin_fd, &t) == 0 ? static_cast<char>(t.c_cc[VEOF]) : '\x04';
      ssize_t rc = write(p->stdin_fd, &veof, 1);
      (void)rc;
    }
    CloseStdin(p);
    return;
  }
  bool want = !p->stdin_buf.empty();
  if (want != p->stdin_registered) {
    if (want) Register(p->stdin_fd, &p->stdin_watch, EPOLLOUT);
    else Unregister(p->stdin_fd);
    p->stdin_registered = want;
  }
}

void Agent::StdinWritable(Process* p) { FlushStdin(p); }

void Agent::CloseStdin(Process* p) {
  if (p->stdin_fd < 0) return;
  if (p->stdin_registered) Unregister(p->stdin_fd);
  p->stdin_registered = false;
  close(p->stdin_fd);
  p->stdin_fd = -1;
  p->stdin_buf.clear();
}

void Agent::Reap() {
  signalfd_siginfo si;
  while (read(sigfd_, &si, sizeof si) == static_cast<ssize_t>(sizeof si)) {
  }
  for (;;) {
    int status;
    pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid <= 0) return;
    auto it = by_pid_.find(pid);
    if (it == by_pid_.end()) continue;  // an orphan we adopted: reaping is all it needs
    Process* p = it->second;
    by_pid_.erase(it);
    p->exited = true;
    p->status = status;
    if (p->tty_hold >= 0) {
      close(p->tty_hold);
      p->tty_hold = -1;
    }
    if (p->conn == nullptr) {
      p->gone = true;
      continue;
    }
    MaybeFinish(p);
  }
}

void Agent::MaybeFinish(Process* p) {
  // EXIT comes last: after both output streams reached EOF, so the host has
  // every byte before it learns the status.
  if (!p->exited || !p->out[0].eof || !p->out[1].eof || p->gone) return;
  PayloadWriter w;
  if (WIFSIGNALED(p->status)) {
    w.I32(-1);
    w.U32(static_cast<uint32_t>(WTERMSIG(p->status)));
  } else {
    w.I32(WEXITSTATUS(p->status));
    w.U32(0);
  }
  Conn* c = p->conn;
  Send(c, Frame(MsgType::Exit, p->id, w.buf()));
  DropProcess(p);
}

void Agent::DropProcess(Process* p) {
  CloseStdin(p);
  if (p->tty_hold >= 0) {
    close(p->tty_hold);
    p->tty_hold = -1;
  }
  for (int s = 0; s < 2; s++) {
    if (p->out[s].fd >= 0) {
      SetOutputRegistered(p, s, false);
      close(p->out[s].fd);
      p->out[s].fd = -1;
    }
  }
  if (p->conn) p->conn->procs.erase(p->id);
  p->conn = nullptr;
  p->gone = true;
}

// A small file (the kernel command line) read whole with read(2). Not an
// ifstream: iostreams would link libstdc++'s locale machinery into the static
// agent, about half its size. False with errno set when it cannot be read.
bool ReadSmallFile(const std::string& path, std::string* out) {
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  char buf[4096];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int saved = errno;
      close(fd);
      errno = saved;
      return false;
    }
    if (n == 0) break;
    out->append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return true;
}

int Usage() {
  std::fprintf(stderr,
               "usage: vmlet-agent [--listen unix:/path | --listen vsock:PORT] [--no-init] [--state-dir DIR]\n"
               "                   [--cmdline-file PATH (as PID 1; default /proc/cmdline)]\n"
               "  As PID 1 it mounts /proc, /sys, /dev..., stacks vmlet.layers= from the kernel command line and\n"
               "  listens on vsock:%u. --no-init runs it as an ordinary program (host tests).\n",
               kDefaultVsockPort);
  return 2;
}

}  // namespace
}  // namespace vmlet::agent

int main(int argc, char** argv) {
  using namespace vmlet::agent;
  std::vector<std::string> listens;
  bool no_init = false;
  std::string state_dir = "/run/vmlet-agent";
  // Tests of the PID-1 path on a host give their own kernel command line.
  std::string cmdline_file = "/proc/cmdline";
  for (int i = 1; i < argc; i++) {
    std::string a = argv[i];
    if (a == "--listen" && i + 1 < argc) listens.push_back(argv[++i]);
    else if (a == "--no-init") no_init = true;
    else if (a == "--state-dir" && i + 1 < argc) state_dir = argv[++i];
    else if (a == "--cmdline-file" && i + 1 < argc) cmdline_file = argv[++i];
    else if (a == "--help" || a == "-h") return Usage(), 0;
    else {
      std::fprintf(stderr, "vmlet-agent: unknown argument '%s'\n", a.c_str());
      return Usage();
    }
  }
  bool init_mode = getpid() == 1 && !no_init;
  getrlimit(RLIMIT_NOFILE, &g_inherited_nofile);
  rlimit raised = g_inherited_nofile;
  raised.rlim_cur = raised.rlim_max;
  setrlimit(RLIMIT_NOFILE, &raised);
  std::vector<std::string> layers;
  if (init_mode) {
    std::vector<std::string> errors;
    MountEarlyFilesystems(&errors);
    for (const std::string& e : errors) Log("%s", e.c_str());
    std::string cmdline;
    if (!ReadSmallFile(cmdline_file, &cmdline))
      Log("cannot read %s (%s): no vmlet.layers or vmlet.port settings", cmdline_file.c_str(), std::strerror(errno));
    KernelCmdline k = ParseKernelCmdline(cmdline);
    layers = k.layers;
    if (listens.empty()) listens.push_back("vsock:" + std::to_string(k.vsock_port ? k.vsock_port : kDefaultVsockPort));
  }
  if (listens.empty()) {
    std::fprintf(stderr, "vmlet-agent: not PID 1 and no --listen given: nothing to serve\n");
    return Usage();
  }
  for (const std::string& spec : listens) {
    if (!ValidListenSpec(spec)) {
      std::fprintf(stderr, "vmlet-agent: --listen '%s': expected unix:/path (under 108 bytes) or vsock:PORT\n", spec.c_str());
      return Usage();
    }
  }
  Agent agent(init_mode, state_dir);
  if (!agent.Setup()) return 1;
  for (const std::string& spec : listens) {
    // As PID 1, exiting would panic the guest and leave the host a serial log
    // only: keep trying (the vsock transport may still be probing).
    while (!agent.Listen(spec)) {
      if (!init_mode) return 1;
      sleep(1);
    }
  }
  if (!layers.empty()) agent.StackFromCmdline(layers);
  agent.Run();
}
