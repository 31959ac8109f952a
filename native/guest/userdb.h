// Resolving an EXEC's user string (`user`, `uid`, `user:group`, `uid:gid`,
// `user:gid`, `uid:group`) against a container rootfs's /etc/passwd and
// /etc/group, the way runc's libcontainer/user.GetExecUser does, so an image
// behaves as it does under Docker or containerd. The agent cannot use
// getpwnam: its static libc would consult the agent's own root (and NSS), not
// the container's, and getpwnam gives no supplementary groups.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace vmlet::agent {

// A user string longer than this is refused before any file is read: names
// are at most 32 bytes on Linux; the slack covers a group part.
constexpr size_t kMaxUserSpec = 256;
// A passwd or group line longer than this is skipped as malformed, without
// being buffered: a group line listing thousands of members still fits.
constexpr size_t kMaxUserDbLine = 256 * 1024;
// Reading stops with an error past this many bytes: the agent serves every
// connection on one thread, and an image's database is read per EXEC.
constexpr uint64_t kMaxUserDbBytes = 32ull << 20;
// setgroups(2) takes at most NGROUPS_MAX (65536) groups.
constexpr size_t kMaxSupplementaryGroups = 65536;

struct PasswdEntry {
  std::string_view name;
  uint32_t uid = 0;
  uint32_t gid = 0;
  std::string_view home;
};

struct GroupEntry {
  std::string_view name;
  uint32_t gid = 0;
  std::string_view members;  // comma-separated user names
};

// One line without its newline. False for lines libc's files database
// would not return: empty, comments, NIS compat (`+`/`-`), fewer fields than
// the ids need, a NUL byte, or ids that are not decimal numbers below 2^32-1.
bool ParsePasswdLine(std::string_view line, PasswdEntry* out);
bool ParseGroupLine(std::string_view line, GroupEntry* out);
bool GroupListsMember(std::string_view members, std::string_view user);

// `user[:group]` split and checked; numeric parts parsed. Empty user means
// the default (uid 0, matched against passwd like runc does).
struct UserSpec {
  std::string user, group;
  bool has_group = false;
  bool user_numeric = false, group_numeric = false;
  uint32_t uid = 0, gid = 0;
};
// False with a message when the string cannot be a user spec at all
// (too long, more than one ':', a numeric id of 2^32-1 or above).
bool ParseUserSpec(const std::string& spec, UserSpec* out, std::string* err);

struct ExecUser {
  uint32_t uid = 0;
  uint32_t gid = 0;
  std::vector<uint32_t> groups;  // supplementary
  std::string home = "/";
};

struct ResolveError {
  bool unknown = false;  // a name was not found (else the databases could not be read)
  std::string message;
};

// root_fd: the rootfs directory (O_PATH is enough). The files are opened
// with RESOLVE_IN_ROOT, so an image's absolute symlink (/etc/passwd ->
// /x) stays inside the rootfs, and must be regular files (a FIFO or
// /dev/zero there would block or never end). where names the rootfs in
// messages.
bool ResolveExecUser(int root_fd, const UserSpec& spec, const std::string& where, ExecUser* out,
                     ResolveError* err);

}  // namespace vmlet::agent
