#include "userdb.h"

#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace vmlet::agent {

namespace {

// Decimal only, as glibc's files database and runc read ids; 2^32-1 is
// (uid_t)-1, which setuid/setgid take to mean "unchanged".
bool ParseId(std::string_view s, uint32_t* out) {
  if (s.empty() || s.size() > 10) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  if (v >= 0xffffffffull) return false;
  *out = static_cast<uint32_t>(v);
  return true;
}

bool AllDigits(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s)
    if (c < '0' || c > '9') return false;
  return true;
}

// Splits at ':' into at most max fields; the last keeps any further ':'.
size_t SplitFields(std::string_view line, std::string_view* f, size_t max) {
  size_t n = 0;
  while (n + 1 < max) {
    size_t c = line.find(':');
    if (c == std::string_view::npos) break;
    f[n++] = line.substr(0, c);
    line.remove_prefix(c + 1);
  }
  f[n++] = line;
  return n;
}

// Lines libc skips before parsing: blank (after leading blanks), '#'
// comments and NIS compat entries, which name no local user.
bool SkippedLine(std::string_view& line) {
  size_t i = 0;
  while (i < line.size() && (line[i] == ' ' || line[i] == '\t')) i++;
  line.remove_prefix(i);
  if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
  if (line.empty() || line[0] == '#' || line[0] == '+' || line[0] == '-') return true;
  return line.find('\0') != std::string_view::npos;
}

std::string Where(const std::string& file, const std::string& where) { return file + " of " + where; }

// Opens etc/<name> inside the rootfs; ENOENT is reported as absent (*fd -1,
// true), other failures as false with errno set.
bool OpenInRoot(int root_fd, const char* rel, int* fd, std::string* why) {
  open_how how{};
  how.flags = O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK;
  how.resolve = RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS;
  int f = static_cast<int>(syscall(SYS_openat2, root_fd, rel, &how, sizeof how));
  if (f < 0) {
    if (errno == ENOENT) {
      *fd = -1;
      return true;
    }
    *why = std::strerror(errno);
    if (errno == ENOSYS) *why += " (openat2 needs Linux 5.6 or later)";
    return false;
  }
  struct stat st;
  if (fstat(f, &st) != 0) {
    *why = std::strerror(errno);
    close(f);
    return false;
  }
  if (!S_ISREG(st.st_mode)) {
    *why = "not a regular file (a FIFO or device here would block the agent or never end)";
    close(f);
    return false;
  }
  // Regular files never return EAGAIN; blocking reads keep the loop below simple.
  fcntl(f, F_SETFL, 0);
  *fd = f;
  return true;
}

// Calls on_line for every line that is at most kMaxUserDbLine bytes; longer
// ones are dropped as they stream past, so memory stays bounded whatever the
// file holds. False with *why on a read error or a file past kMaxUserDbBytes.
template <class F>
bool ForEachLine(int fd, F on_line, std::string* why) {
  std::string line;
  bool overlong = false;
  uint64_t total = 0;
  char buf[16384];
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      *why = std::strerror(errno);
      return false;
    }
    if (n == 0) break;
    total += static_cast<uint64_t>(n);
    if (total > kMaxUserDbBytes) {
      *why = "larger than " + std::to_string(kMaxUserDbBytes >> 20) + " MiB";
      return false;
    }
    std::string_view chunk(buf, static_cast<size_t>(n));
    while (!chunk.empty()) {
      size_t nl = chunk.find('\n');
      std::string_view part = chunk.substr(0, nl);
      if (!overlong) {
        if (line.size() + part.size() > kMaxUserDbLine) {
          overlong = true;
          line.clear();
          line.shrink_to_fit();
        } else {
          line.append(part);
        }
      }
      if (nl == std::string_view::npos) break;
      if (!overlong) on_line(std::string_view(line));
      line.clear();
      overlong = false;
      chunk.remove_prefix(nl + 1);
    }
  }
  if (!overlong && !line.empty()) on_line(std::string_view(line));
  return true;
}

}  // namespace

bool ParsePasswdLine(std::string_view line, PasswdEntry* out) {
  if (SkippedLine(line)) return false;
  std::string_view f[7];
  size_t n = SplitFields(line, f, 7);
  if (n < 4 || f[0].empty()) return false;
  if (!ParseId(f[2], &out->uid) || !ParseId(f[3], &out->gid)) return false;
  out->name = f[0];
  out->home = n >= 6 ? f[5] : std::string_view();
  return true;
}

bool ParseGroupLine(std::string_view line, GroupEntry* out) {
  if (SkippedLine(line)) return false;
  std::string_view f[4];
  size_t n = SplitFields(line, f, 4);
  if (n < 3 || f[0].empty()) return false;
  if (!ParseId(f[2], &out->gid)) return false;
  out->name = f[0];
  out->members = n >= 4 ? f[3] : std::string_view();
  return true;
}

bool GroupListsMember(std::string_view members, std::string_view user) {
  if (user.empty()) return false;
  while (!members.empty()) {
    size_t c = members.find(',');
    std::string_view m = members.substr(0, c);
    while (!m.empty() && (m.front() == ' ' || m.front() == '\t')) m.remove_prefix(1);
    while (!m.empty() && (m.back() == ' ' || m.back() == '\t')) m.remove_suffix(1);
    if (m == user) return true;
    if (c == std::string_view::npos) break;
    members.remove_prefix(c + 1);
  }
  return false;
}

bool ParseUserSpec(const std::string& spec, UserSpec* out, std::string* err) {
  if (spec.size() > kMaxUserSpec) {
    *err = "EXEC user is " + std::to_string(spec.size()) + " bytes; at most " + std::to_string(kMaxUserSpec) +
           " (user[:group])";
    return false;
  }
  size_t colon = spec.find(':');
  if (colon != std::string::npos && spec.find(':', colon + 1) != std::string::npos) {
    *err = "EXEC user '" + spec + "' has more than one ':'; give user, uid, user:group or uid:gid";
    return false;
  }
  out->user = spec.substr(0, colon);
  // runc reads "user:" as "user": an empty group part means no group.
  out->group = colon == std::string::npos ? std::string() : spec.substr(colon + 1);
  out->has_group = !out->group.empty();
  out->user_numeric = AllDigits(out->user);
  out->group_numeric = AllDigits(out->group);
  if (out->user_numeric && !ParseId(out->user, &out->uid)) {
    *err = "EXEC user '" + spec + "': uid " + out->user + " is not below 4294967295";
    return false;
  }
  if (out->group_numeric && !ParseId(out->group, &out->gid)) {
    *err = "EXEC user '" + spec + "': gid " + out->group + " is not below 4294967295";
    return false;
  }
  return true;
}

bool ResolveExecUser(int root_fd, const UserSpec& spec, const std::string& where, ExecUser* out,
                     ResolveError* err) {
  ExecUser u;
  std::string why;
  int fd = -1;
  if (!OpenInRoot(root_fd, "etc/passwd", &fd, &why)) {
    err->message = "resolving user '" + spec.user + "': opening " + Where("/etc/passwd", where) + ": " + why;
    return false;
  }
  bool matched = false;
  std::string matched_name;
  if (fd >= 0) {
    // First match wins, as in libc and runc. An empty user is the default
    // user, uid 0: its home and groups come from passwd when it is there.
    bool ok = ForEachLine(fd, [&](std::string_view line) {
      PasswdEntry e;
      if (matched || !ParsePasswdLine(line, &e)) return;
      bool hit = spec.user.empty() ? e.uid == 0 : spec.user_numeric ? e.uid == spec.uid : e.name == spec.user;
      if (!hit) return;
      matched = true;
      matched_name = e.name;
      u.uid = e.uid;
      u.gid = e.gid;
      if (!e.home.empty()) u.home = e.home;
    }, &why);
    close(fd);
    if (!ok) {
      err->message = "resolving user '" + spec.user + "': reading " + Where("/etc/passwd", where) + ": " + why;
      return false;
    }
  }
  if (!matched && !spec.user.empty()) {
    if (!spec.user_numeric) {
      err->unknown = true;
      err->message = "user '" + spec.user + "' not found in " + Where("/etc/passwd", where) +
                     (fd < 0 ? " (the file does not exist)" : "") + ": give a user the image defines, or a numeric uid";
      return false;
    }
    // A numeric uid needs no entry; its group then defaults to 0 (runc).
    u.uid = spec.uid;
  }
  if (spec.has_group && spec.group_numeric) {
    // runc looks a numeric group up only to use the gid it already has.
    u.gid = spec.gid;
  } else if (spec.has_group || matched) {
    if (!OpenInRoot(root_fd, "etc/group", &fd, &why)) {
      err->message = "resolving user '" + spec.user + (spec.has_group ? ":" + spec.group : "") + "': opening " +
                     Where("/etc/group", where) + ": " + why;
      return false;
    }
    bool group_found = false;
    if (fd >= 0) {
      bool too_many = false;
      bool ok = ForEachLine(fd, [&](std::string_view line) {
        GroupEntry g;
        if (!ParseGroupLine(line, &g)) return;
        if (spec.has_group) {
          if (!group_found && g.name == spec.group) {
            group_found = true;
            u.gid = g.gid;
          }
          return;
        }
        // Supplementary groups: every group that lists the user by name
        // (Docker and runc do this); an explicit group replaces them.
        if (!GroupListsMember(g.members, matched_name)) return;
        for (uint32_t have : u.groups)
          if (have == g.gid) return;
        if (u.groups.size() >= kMaxSupplementaryGroups) {
          too_many = true;
          return;
        }
        u.groups.push_back(g.gid);
      }, &why);
      close(fd);
      if (!ok || too_many) {
        err->message = "resolving user '" + spec.user + "': reading " + Where("/etc/group", where) + ": " +
                       (ok ? "lists the user in more than 65536 groups (the kernel's NGROUPS_MAX)" : why);
        return false;
      }
    }
    if (spec.has_group && !group_found) {
      err->unknown = true;
      err->message = "group '" + spec.group + "' not found in " + Where("/etc/group", where) +
                     (fd < 0 ? " (the file does not exist)" : "") + ": give a group the image defines, or a numeric gid";
      return false;
    }
  }
  *out = std::move(u);
  return true;
}

}  // namespace vmlet::agent
