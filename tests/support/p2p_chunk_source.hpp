// A P2PChunkSource for tests, benchmarks and fuzzers: one provider's BAR as a first-fit
// pool, with switches for "no p2pdma" and "dying", and a record of what came back.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "physr/mem/uspace.hpp"

namespace physr::testing {

class TestChunkSource : public mem::P2PChunkSource {
 public:
  TestChunkSource(PhysSpan bar, ProviderId id, std::string name = "0000:03:00.0")
      : bar_(bar), id_(id), name_(std::move(name)) {}

  bool has_p2pdma() const override { return p2pdma; }
  ProviderId provider() const override { return id_; }
  std::string name() const override { return name_; }
  Result<mem::P2PChunk> alloc(uint64_t size) override {
    if (dying) return make_error(ENODEV, name_ + ": the p2pdma pool is dying");
    uint64_t cand = bar_.base.value();
    for (const auto& [a, n] : live_) {
      if (a - cand >= size) break;
      cand = a + n;
    }
    if (cand + size > bar_.base.value() + bar_.size) return make_error(ENOMEM, name_ + ": the p2pdma pool has no " + format_size(size));
    live_[cand] = size;
    ++allocs;
    return mem::P2PChunk{PhysSpan{PhysAddr(cand), size}, id_};
  }
  Status release(PhysSpan span) override {
    auto it = live_.find(span.base.value());
    if (it == live_.end() || it->second != span.size)
      return make_error(EINVAL, name_ + ": release of " + format_hex(span.base.value()) + " that is not a live chunk");
    live_.erase(it);
    released.push_back(span);
    return {};
  }
  size_t live_chunks() const { return live_.size(); }
  uint64_t live_bytes() const {
    uint64_t n = 0;
    for (const auto& [a, s] : live_) n += s;
    return n;
  }
  PhysSpan bar() const { return bar_; }

  bool p2pdma = true;
  bool dying = false;
  size_t allocs = 0;
  std::vector<PhysSpan> released;

 private:
  PhysSpan bar_;
  ProviderId id_;
  std::string name_;
  std::map<uint64_t, uint64_t> live_;
};

}  // namespace physr::testing
