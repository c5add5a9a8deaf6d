// A JSON document written as it is produced: the same bytes nlohmann::json::dump(indent)
// prints for the whole document, without ever holding it. Commands whose output grows
// with the input (every device pair, every range, every DMA segment) stream their arrays
// through it, so their memory stays bounded by one element. The caller gives the keys of
// each object in sorted order, as nlohmann::json's std::map keeps them.
#pragma once

#include <fmt/format.h>

#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace physr::cli {

class JsonWriter {
 public:
  /// Writes to `out` (stdout for commands) with `indent` spaces per level.
  JsonWriter(std::FILE* out, int indent) : out_(out), indent_(indent) { buf_.reserve(kFlushAt + 4096); }
  JsonWriter(const JsonWriter&) = delete;
  JsonWriter& operator=(const JsonWriter&) = delete;
  ~JsonWriter() { flush(); }

  void begin_object() { open('{'); }
  void end_object() { close('}'); }
  void begin_array() { open('['); }
  void end_array() { close(']'); }
  /// Inside an object: the next member's key; its value follows.
  void key(std::string_view k) {
    prefix();
    string(k);
    buf_ += ": ";
    after_key_ = true;
  }
  /// A whole value (small: one element of a big array), indented to the current level.
  void value(const nlohmann::json& v) {
    prefix();
    const std::string s = dump(v, indent_);
    const std::string pad(static_cast<size_t>(indent_) * open_.size(), ' ');
    for (char c : s) {
      buf_ += c;
      if (c == '\n') buf_ += pad;  // JSON strings hold no raw newline: each is a line break
    }
    maybe_flush();
  }
  void unsigned_value(uint64_t v) {
    prefix();
    buf_ += fmt::format_int(v).str();
  }
  void string_value(std::string_view s) {
    prefix();
    string(s);
  }
  /// An element written by the caller: `write(buf, inner, outer)` appends its text to
  /// buf, with `inner` the indentation of its members' lines and `outer` that of its
  /// closing bracket; for the hot loops, where building a nlohmann::json per element costs
  /// more than printing it.
  template <class F>
  void element(F&& write) {
    prefix();
    const size_t outer = static_cast<size_t>(indent_) * open_.size();
    if (pad_.size() != outer + static_cast<size_t>(indent_)) pad_.assign(outer + static_cast<size_t>(indent_), ' ');
    write(buf_, std::string_view(pad_), std::string_view(pad_).substr(0, outer));
    maybe_flush();
  }
  /// A newline after the document, as the commands print one.
  void newline() { buf_ += '\n'; }
  /// The JSON text of a string (quoted and escaped as nlohmann does; bytes that are not
  /// UTF-8 become U+FFFD), for element().
  static std::string quoted(std::string_view s) { return nlohmann::json(std::string(s)).dump(-1, ' ', false, kReplace); }
  /// What the writer has buffered, out to the file (write errors show in std::ferror()).
  void flush() {
    if (!buf_.empty()) std::fwrite(buf_.data(), 1, buf_.size(), out_);
    buf_.clear();
  }

 private:
  static constexpr size_t kFlushAt = 1 << 20;
  static constexpr auto kReplace = nlohmann::json::error_handler_t::replace;

  static std::string dump(const nlohmann::json& v, int indent) { return v.dump(indent, ' ', false, kReplace); }
  void string(std::string_view s) { buf_ += quoted(s); }
  // What goes before a value: nothing after a key or at the top; inside a container a
  // comma for all but the first element, then a newline and the element's indentation.
  void prefix() {
    if (after_key_) {
      after_key_ = false;
      return;
    }
    if (open_.empty()) return;
    buf_ += open_.back() ? ",\n" : "\n";
    open_.back() = true;
    buf_.append(static_cast<size_t>(indent_) * open_.size(), ' ');
  }
  void open(char c) {
    prefix();
    buf_ += c;
    open_.push_back(false);
  }
  // An empty container closes on its own line ("[]", "{}"), as nlohmann prints it.
  void close(char c) {
    const bool any = open_.back();
    open_.pop_back();
    if (any) {
      buf_ += '\n';
      buf_.append(static_cast<size_t>(indent_) * open_.size(), ' ');
    }
    buf_ += c;
    maybe_flush();
  }
  void maybe_flush() {
    if (buf_.size() >= kFlushAt) flush();
  }

  std::FILE* out_;
  int indent_;
  std::string buf_;
  std::string pad_;
  std::vector<bool> open_;  // per open container: whether it has an element yet
  bool after_key_ = false;
};

}  // namespace physr::cli
