// A minimal harness for the native tests: each case registers itself; the
// binary lists or runs them, and mocha (test/unit/native.test.ts) turns each
// case into a mocha test so failures show up by name in `npm test`.
#pragma once
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace vmlet::testing {

struct Case {
  std::string name;
  std::function<void()> fn;
};
std::vector<Case>& Cases();

struct Registrar {
  Registrar(const char* name, std::function<void()> fn) { Cases().push_back({name, std::move(fn)}); }
};

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace vmlet::testing

#define VMLET_TEST_CAT2(a, b) a##b
#define VMLET_TEST_CAT(a, b) VMLET_TEST_CAT2(a, b)
#define TEST_CASE(name)                                                                  \
  static void VMLET_TEST_CAT(test_fn_, __LINE__)();                                       \
  static ::vmlet::testing::Registrar VMLET_TEST_CAT(test_reg_, __LINE__)(name, VMLET_TEST_CAT(test_fn_, __LINE__)); \
  static void VMLET_TEST_CAT(test_fn_, __LINE__)()

#define EXPECT(cond)                                                                      \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::ostringstream vmlet_os_;                                                       \
      vmlet_os_ << __FILE__ << ":" << __LINE__ << ": expected " #cond;                    \
      throw ::vmlet::testing::Failure(vmlet_os_.str());                                   \
    }                                                                                     \
  } while (0)

#define EXPECT_EQ(a, b)                                                                   \
  do {                                                                                    \
    auto vmlet_a_ = (a);                                                                  \
    auto vmlet_b_ = (b);                                                                  \
    if (!(vmlet_a_ == vmlet_b_)) {                                                        \
      std::ostringstream vmlet_os_;                                                       \
      vmlet_os_ << __FILE__ << ":" << __LINE__ << ": expected " #a " == " #b ", got "     \
                << +vmlet_a_ << " vs " << +vmlet_b_;                                      \
      throw ::vmlet::testing::Failure(vmlet_os_.str());                                   \
    }                                                                                     \
  } while (0)

#define EXPECT_THROWS(expr)                                                               \
  do {                                                                                    \
    bool vmlet_threw_ = false;                                                            \
    try { expr; } catch (const std::exception&) { vmlet_threw_ = true; }                  \
    if (!vmlet_threw_)                                                                    \
      throw ::vmlet::testing::Failure(std::string(__FILE__) + ":" + std::to_string(__LINE__) + ": expected " #expr " to throw"); \
  } while (0)
