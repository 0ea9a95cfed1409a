// A minimal streaming JSON writer (objects, arrays, numbers, strings, booleans) for
// kvstress's --json output; the project has no JSON dependency and needs none for this.
#ifndef KVMEM_TOOLS_KVSTRESS_JSON_WRITER_H_
#define KVMEM_TOOLS_KVSTRESS_JSON_WRITER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace kvstress {

// Usage: w.BeginObject(); w.Key("a"); w.Int(1); w.EndObject(); w.str().
// Commas are inserted automatically; keys only inside objects (not checked).
class JsonWriter {
 public:
  void BeginObject() { Open('{'); }
  void EndObject() { Close('}'); }
  void BeginArray() { Open('['); }
  void EndArray() { Close(']'); }
  void Key(absl::string_view key);
  void String(absl::string_view s);
  void Int(int64_t v);
  void Double(double v);  // non-finite values are written as null
  void Bool(bool v);

  // Convenience: "key": value.
  template <typename T>
  void Field(absl::string_view key, const T& v) {
    Key(key);
    Value(v);
  }

  const std::string& str() const { return out_; }

 private:
  void Value(absl::string_view v) { String(v); }
  void Value(const std::string& v) { String(v); }
  void Value(const char* v) { String(v); }
  void Value(bool v) { Bool(v); }
  void Value(double v) { Double(v); }
  void Value(int v) { Int(v); }
  void Value(int64_t v) { Int(v); }
  void Value(uint64_t v) { Int(static_cast<int64_t>(v)); }

  void Open(char c);
  void Close(char c);
  void Separate();

  std::string out_;
  std::vector<bool> first_;  // per open container: no element written yet
  bool after_key_ = false;
};

}  // namespace kvstress

#endif  // KVMEM_TOOLS_KVSTRESS_JSON_WRITER_H_
