#include "src/cache/prefix_index.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <memory>
#include <utility>

#include "absl/hash/hash.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "openssl/evp.h"

namespace kvmem {

namespace {

// SHA-256 fetched once (an implicit fetch per digest costs about a microsecond in
// OpenSSL 3) and one digest context per thread, reused.
const EVP_MD* Sha256() {
  static const EVP_MD* md = [] {
    const EVP_MD* fetched = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    return fetched != nullptr ? fetched : EVP_sha256();
  }();
  return md;
}

struct CtxFree {
  void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
};

EVP_MD_CTX* DigestContext() {
  thread_local std::unique_ptr<EVP_MD_CTX, CtxFree> ctx(EVP_MD_CTX_new());
  return ctx.get();
}

}  // namespace

BlockHash PrefixBlockHash(const BlockHash* parent, absl::string_view salt,
                          absl::Span<const int32_t> tokens) {
  // Fixed little-endian encodings, so that the hash does not depend on the machine.
  static constexpr BlockHash kNoParent{};
  uint8_t salt_len[8];
  for (int i = 0; i < 8; ++i) salt_len[i] = static_cast<uint8_t>(uint64_t{salt.size()} >> (8 * i));
  BlockHash out{};
  unsigned int len = 0;
  EVP_MD_CTX* ctx = DigestContext();
  bool ok = ctx != nullptr && EVP_DigestInit_ex2(ctx, Sha256(), nullptr) == 1;
  const BlockHash& up = parent != nullptr ? *parent : kNoParent;
  ok = ok && EVP_DigestUpdate(ctx, up.data(), up.size()) == 1 &&
       EVP_DigestUpdate(ctx, salt_len, sizeof(salt_len)) == 1 &&
       EVP_DigestUpdate(ctx, salt.data(), salt.size()) == 1;
  if constexpr (std::endian::native == std::endian::little) {
    ok = ok && EVP_DigestUpdate(ctx, tokens.data(), tokens.size() * sizeof(int32_t)) == 1;
  } else {
    for (int32_t t : tokens) {
      const auto u = static_cast<uint32_t>(t);
      const uint8_t le[4] = {static_cast<uint8_t>(u), static_cast<uint8_t>(u >> 8),
                             static_cast<uint8_t>(u >> 16), static_cast<uint8_t>(u >> 24)};
      ok = ok && EVP_DigestUpdate(ctx, le, sizeof(le)) == 1;
    }
  }
  ok = ok && EVP_DigestFinal_ex(ctx, out.data(), &len) == 1 && len == out.size();
  // OpenSSL fails here only when it cannot allocate; the hash is then all zero (it names
  // blocks in events only, never as a look-up key).
  if (!ok) out.fill(0);
  return out;
}

std::vector<BlockHash> PrefixBlockHashes(absl::Span<const int32_t> tokens, int64_t block_tokens,
                                         absl::string_view salt) {
  std::vector<BlockHash> out;
  if (block_tokens < 1) return out;
  const size_t blocks = tokens.size() / static_cast<size_t>(block_tokens);
  out.reserve(blocks);
  for (size_t b = 0; b < blocks; ++b) {
    out.push_back(PrefixBlockHash(b == 0 ? nullptr : &out.back(), salt,
                                  tokens.subspan(b * block_tokens, block_tokens)));
  }
  return out;
}

namespace internal {
namespace {

uint64_t DefaultKeyHash(uint64_t parent_key, absl::Span<const int32_t> tokens) {
  // A multiply-xorshift chain: ~1 ns per token. Collisions cost a comparison, never a
  // wrong hit (FindChild compares the tokens), so it need not be cryptographic.
  uint64_t h = parent_key ^ 0x9E3779B97F4A7C15ull;
  for (int32_t t : tokens) {
    h = (h ^ static_cast<uint32_t>(t)) * 0xBF58476D1CE4E5B9ull;
    h ^= h >> 31;
  }
  h *= 0x94D049BB133111EBull;
  return h ^ (h >> 29);
}

template <typename... Args>
absl::Status Corrupt(const absl::FormatSpec<Args...>& format, const Args&... args) {
  return absl::InternalError(absl::StrCat("prefix index: ", absl::StrFormat(format, args...)));
}

}  // namespace

PrefixIndex::PrefixIndex(int64_t block_tokens, KeyHash key_hash)
    : block_tokens_(block_tokens), key_hash_(key_hash != nullptr ? key_hash : &DefaultKeyHash) {}

uint64_t PrefixIndex::KeyOf(uint64_t parent_key, absl::Span<const int32_t> tokens) const {
  return key_hash_(parent_key, tokens);
}

PrefixIndex::NodeId PrefixIndex::FindRoot(absl::string_view salt) const {
  auto it = roots_.find(salt);
  return it == roots_.end() ? -1 : it->second;
}

PrefixIndex::NodeId PrefixIndex::FindChild(NodeId parent, absl::Span<const int32_t> tokens) const {
  auto it = by_key_.find(KeyOf(nodes_[parent].key, tokens));
  if (it == by_key_.end()) return -1;
  for (NodeId n = it->second; n >= 0; n = nodes_[n].next_same_key) {
    if (nodes_[n].parent == parent &&
        std::equal(tokens.begin(), tokens.end(), TokensOf(n).begin())) {
      return n;
    }
  }
  return -1;
}

PrefixIndex::NodeId PrefixIndex::NewNode() {
  NodeId n;
  if (!free_nodes_.empty()) {
    n = free_nodes_.back();
    free_nodes_.pop_back();
  } else {
    n = static_cast<NodeId>(nodes_.size());
    nodes_.emplace_back();
    tokens_.resize(tokens_.size() + block_tokens_);
  }
  nodes_[n] = Node{};
  nodes_[n].live = true;
  return n;
}

void PrefixIndex::EraseLeaf(NodeId n) {
  const Node& node = nodes_[n];
  leaves_.erase(LeafKey{node.priority, node.tick, n});
}

void PrefixIndex::InsertLeaf(NodeId n) {
  const Node& node = nodes_[n];
  leaves_.insert(LeafKey{node.priority, node.tick, n});
}

void PrefixIndex::Touch(NodeId n, int32_t priority) {
  Node& node = nodes_[n];
  const bool leaf = IsLeaf(node);
  if (leaf) EraseLeaf(n);
  node.priority = std::max(node.priority, priority);
  node.tick = ++tick_;
  if (leaf) InsertLeaf(n);
}

void PrefixIndex::Unlink(NodeId n) {
  auto it = by_key_.find(nodes_[n].key);
  if (it->second == n) {
    if (nodes_[n].next_same_key >= 0) {
      it->second = nodes_[n].next_same_key;
    } else {
      by_key_.erase(it);
    }
    return;
  }
  for (NodeId p = it->second; p >= 0; p = nodes_[p].next_same_key) {
    if (nodes_[p].next_same_key == n) {
      nodes_[p].next_same_key = nodes_[n].next_same_key;
      return;
    }
  }
}

void PrefixIndex::PushEvent(PrefixEvent::Kind kind, const Node& n) {
  if (events_.size() >= kMaxPrefixEvents) {
    events_.pop_front();
    ++counters_.events_dropped;
  }
  PrefixEvent e;
  e.kind = kind;
  e.sequence = next_sequence_++;
  e.block_hash = n.hash;
  const Node& parent = nodes_[n.parent];
  e.has_parent = parent.parent >= 0;
  if (e.has_parent) e.parent_hash = parent.hash;
  e.num_tokens = static_cast<int32_t>(block_tokens_);
  events_.push_back(e);
}

void PrefixIndex::Match(absl::Span<const int32_t> tokens, absl::string_view salt,
                        std::vector<NodeId>* out) const {
  out->clear();
  NodeId parent = FindRoot(salt);
  if (parent < 0) return;
  const size_t blocks = tokens.size() / static_cast<size_t>(block_tokens_);
  for (size_t b = 0; b < blocks; ++b) {
    const NodeId child = FindChild(parent, tokens.subspan(b * block_tokens_, block_tokens_));
    if (child < 0) return;
    out->push_back(child);
    parent = child;
  }
}

void PrefixIndex::Attach(Holder* h, absl::Span<const NodeId> nodes,
                         absl::Span<const int32_t> tokens) {
  h->tokens.assign(tokens.begin(), tokens.begin() + nodes.size() * block_tokens_);
  h->chain.assign(nodes.begin(), nodes.end());
  for (NodeId n : nodes) {
    ++nodes_[n].holders;
    Touch(n, h->priority);
  }
}

void PrefixIndex::Copy(const Holder& from, Holder* to) {
  *to = from;
  for (NodeId n : to->chain) ++nodes_[n].holders;
}

void PrefixIndex::Detach(Holder* h) {
  for (NodeId n : h->chain) {
    Touch(n, h->priority);
    --nodes_[n].holders;
  }
  *h = Holder{};
}

void PrefixIndex::Clip(Holder* h, int64_t new_len) {
  if (static_cast<int64_t>(h->tokens.size()) <= new_len) return;
  h->tokens.resize(new_len);
  const size_t keep = static_cast<size_t>(new_len / block_tokens_);
  for (size_t i = keep; i < h->chain.size(); ++i) --nodes_[h->chain[i]].holders;
  if (h->chain.size() > keep) h->chain.resize(keep);
}

absl::Status PrefixIndex::PlanPublish(const Holder& h, absl::string_view salt,
                                      absl::Span<const int32_t> tokens, int64_t length,
                                      absl::Span<const int32_t> row_pages,
                                      PublishPlan* plan) const {
  plan->existing.clear();
  if (h.bound && salt != h.salt) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "the request's salt is \"%s\" (given when it started or first published), not \"%s\"",
        absl::CHexEscape(h.salt), absl::CHexEscape(salt)));
  }
  if (static_cast<int64_t>(tokens.size()) > length) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%d token ids for a request of %d tokens (give its tokens, or a prefix of them)",
        tokens.size(), length));
  }
  const size_t common = std::min(tokens.size(), h.tokens.size());
  const auto diff = std::mismatch(tokens.begin(), tokens.begin() + common, h.tokens.begin());
  if (diff.first != tokens.begin() + common) {
    const size_t pos = diff.first - tokens.begin();
    return absl::InvalidArgumentError(
        absl::StrFormat("token %d is %d, but %d was published (or matched) for this request before",
                        pos, tokens[pos], h.tokens[pos]));
  }
  const size_t have = h.chain.size();
  const size_t want = tokens.size() / static_cast<size_t>(block_tokens_);
  if (want <= have) return absl::OkStatus();
  if (row_pages.size() < want) {
    return absl::InternalError(absl::StrFormat("prefix index: %d blocks but the row has %d pages",
                                               want, row_pages.size()));
  }
  NodeId parent = have == 0 ? FindRoot(salt) : h.chain.back();
  for (size_t b = have; b < want; ++b) {
    const NodeId existing =
        parent >= 0 ? FindChild(parent, tokens.subspan(b * block_tokens_, block_tokens_)) : -1;
    const auto pinned = by_page_.find(row_pages[b]);
    if (pinned != by_page_.end() && pinned->second != existing) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "block %d (tokens [%d, %d)): its page %d already caches other tokens (another "
          "prefix or salt; a fork published differently?)",
          b, b * block_tokens_, (b + 1) * block_tokens_, row_pages[b]));
    }
    plan->existing.push_back(existing);
    parent = existing;
  }
  return absl::OkStatus();
}

void PrefixIndex::CommitPublish(Holder* h, absl::string_view salt, absl::Span<const int32_t> tokens,
                                absl::Span<const int32_t> row_pages, const PublishPlan& plan,
                                std::vector<int32_t>* pin) {
  if (!h->bound) {
    h->bound = true;
    h->salt = std::string(salt);
  }
  const size_t have = h->chain.size();
  NodeId parent = have == 0 ? FindRoot(salt) : h->chain.back();
  for (size_t k = 0; k < plan.existing.size(); ++k) {
    const size_t b = have + k;
    const absl::Span<const int32_t> block = tokens.subspan(b * block_tokens_, block_tokens_);
    if (const NodeId existing = plan.existing[k]; existing >= 0) {
      ++nodes_[existing].holders;
      Touch(existing, h->priority);
      h->chain.push_back(existing);
      parent = existing;
      continue;
    }
    if (parent < 0) {  // the first block under this salt
      parent = NewNode();
      nodes_[parent].salt = std::string(salt);
      nodes_[parent].key = absl::Hash<std::string>{}(nodes_[parent].salt);
      roots_.emplace(nodes_[parent].salt, parent);
    }
    const NodeId n = NewNode();
    Node& node = nodes_[n];
    Node& up = nodes_[parent];
    node.parent = parent;
    node.page = row_pages[b];
    node.key = KeyOf(up.key, block);
    node.holders = 1;
    node.priority = h->priority;
    node.tick = ++tick_;
    node.hash = PrefixBlockHash(up.parent >= 0 ? &up.hash : nullptr, salt, block);
    std::copy(block.begin(), block.end(), tokens_.begin() + static_cast<size_t>(n) * block_tokens_);
    auto [it, inserted] = by_key_.try_emplace(node.key, n);
    if (!inserted) {  // a colliding key: chain it in front
      node.next_same_key = it->second;
      it->second = n;
    }
    by_page_.emplace(node.page, n);
    if (IsLeaf(up)) EraseLeaf(parent);
    ++up.children;
    InsertLeaf(n);
    ++live_nodes_;
    ++counters_.stored_blocks;
    PushEvent(PrefixEvent::Kind::kStored, node);
    pin->push_back(node.page);
    h->chain.push_back(n);
    parent = n;
  }
  if (tokens.size() > h->tokens.size()) h->tokens.assign(tokens.begin(), tokens.end());
}

int32_t PrefixIndex::EvictOne(const std::function<bool(int32_t)>& idle) {
  for (auto it = leaves_.begin(); it != leaves_.end(); ++it) {
    const NodeId n = std::get<2>(*it);
    Node& node = nodes_[n];
    if (node.holders > 0 || !idle(node.page)) continue;
    leaves_.erase(it);
    Unlink(n);
    by_page_.erase(node.page);
    const NodeId parent = node.parent;
    Node& up = nodes_[parent];
    --up.children;
    PushEvent(PrefixEvent::Kind::kRemoved, node);
    if (up.parent < 0) {
      if (up.children == 0) {  // the last block under this salt
        roots_.erase(up.salt);
        up = Node{};
        free_nodes_.push_back(parent);
      }
    } else if (up.children == 0) {
      InsertLeaf(parent);
    }
    const int32_t page = node.page;
    node = Node{};
    free_nodes_.push_back(n);
    --live_nodes_;
    ++counters_.evicted_blocks;
    return page;
  }
  return -1;
}

int64_t PrefixIndex::EvictablePages(const std::function<bool(int32_t)>& idle) const {
  // A node that cannot go blocks its ancestors (they stay interior); each walk up stops
  // at a node already blocked, so every node is marked once.
  std::vector<char> blocked(nodes_.size(), 0);
  for (NodeId n = 0; n < static_cast<NodeId>(nodes_.size()); ++n) {
    const Node& node = nodes_[n];
    if (!node.live || node.parent < 0 || (node.holders == 0 && idle(node.page))) continue;
    for (NodeId m = n; m >= 0 && nodes_[m].parent >= 0 && !blocked[m]; m = nodes_[m].parent) {
      blocked[m] = 1;
    }
  }
  int64_t count = 0;
  for (NodeId n = 0; n < static_cast<NodeId>(nodes_.size()); ++n) {
    count += nodes_[n].live && nodes_[n].parent >= 0 && !blocked[n];
  }
  return count;
}

void PrefixIndex::TakeEvents(std::vector<PrefixEvent>* out) {
  out->insert(out->end(), events_.begin(), events_.end());
  events_.clear();
}

absl::Status PrefixIndex::CheckConsistency(absl::Span<const Holder* const> holders,
                                           const std::function<bool(int32_t)>& pinned,
                                           int64_t pinned_pages) const {
  std::vector<int32_t> children(nodes_.size(), 0);
  std::vector<int32_t> held(nodes_.size(), 0);
  int64_t live = 0, leaves = 0;
  for (NodeId n = 0; n < static_cast<NodeId>(nodes_.size()); ++n) {
    const Node& node = nodes_[n];
    if (!node.live || node.parent < 0) continue;
    ++live;
    const Node& up = nodes_[node.parent];
    if (!up.live) return Corrupt("node %d has a dead parent %d", n, node.parent);
    ++children[node.parent];
    if (!pinned(node.page))
      return Corrupt("node %d caches page %d, which is not pinned", n, node.page);
    auto p = by_page_.find(node.page);
    if (p == by_page_.end() || p->second != n) {
      return Corrupt("node %d caches page %d, but the page map says otherwise", n, node.page);
    }
    if (node.key != KeyOf(up.key, TokensOf(n))) return Corrupt("node %d has a stale key", n);
    auto k = by_key_.find(node.key);
    bool found = false;
    for (NodeId c = k == by_key_.end() ? -1 : k->second; c >= 0; c = nodes_[c].next_same_key) {
      if (!nodes_[c].live || nodes_[c].key != node.key) {
        return Corrupt("key chain of node %d holds node %d", n, c);
      }
      found |= c == n;
    }
    if (!found) return Corrupt("node %d is not in the key map", n);
  }
  for (NodeId n = 0; n < static_cast<NodeId>(nodes_.size()); ++n) {
    const Node& node = nodes_[n];
    if (!node.live) continue;
    if (node.children != children[n]) {
      return Corrupt("node %d counts %d children, has %d", n, node.children, children[n]);
    }
    if (node.parent < 0) {
      auto r = roots_.find(node.salt);
      if (r == roots_.end() || r->second != n || node.children == 0) {
        return Corrupt("root %d (salt \"%s\", %d children) is not a listed root", n,
                       absl::CHexEscape(node.salt), node.children);
      }
      continue;
    }
    const bool in_set = leaves_.contains(LeafKey{node.priority, node.tick, n});
    if (in_set != IsLeaf(node)) {
      return Corrupt("node %d: leaf %d but in the eviction order %d", n, IsLeaf(node), in_set);
    }
    leaves += IsLeaf(node);
  }
  if (live != live_nodes_ || live != static_cast<int64_t>(by_page_.size()) ||
      live != pinned_pages) {
    return Corrupt("%d nodes, counted %d, %d pages mapped, %d pages pinned", live, live_nodes_,
                   by_page_.size(), pinned_pages);
  }
  if (leaves != static_cast<int64_t>(leaves_.size())) {
    return Corrupt("%d leaves, %d in the eviction order", leaves, leaves_.size());
  }
  for (const auto& [salt, root] : roots_) {
    if (!nodes_[root].live || nodes_[root].parent >= 0 || nodes_[root].salt != salt) {
      return Corrupt("root of salt \"%s\" is node %d, which is not that root",
                     absl::CHexEscape(salt), root);
    }
  }
  for (const Holder* h : holders) {
    if (h->chain.size() != h->tokens.size() / static_cast<size_t>(block_tokens_)) {
      return Corrupt("a holder of %d tokens names %d blocks", h->tokens.size(), h->chain.size());
    }
    if (!h->chain.empty() && !h->bound) return Corrupt("a holder names blocks but has no salt");
    for (size_t b = 0; b < h->chain.size(); ++b) {
      const NodeId n = h->chain[b];
      if (n < 0 || n >= static_cast<NodeId>(nodes_.size()) || !nodes_[n].live ||
          nodes_[n].parent < 0) {
        return Corrupt("a holder names node %d, which is not cached", n);
      }
      ++held[n];
      const NodeId want_parent = b == 0 ? FindRoot(h->salt) : h->chain[b - 1];
      if (nodes_[n].parent != want_parent) {
        return Corrupt("a holder's block %d is node %d, whose parent is %d, not %d", b, n,
                       nodes_[n].parent, want_parent);
      }
      if (!std::equal(TokensOf(n).begin(), TokensOf(n).end(),
                      h->tokens.begin() + b * block_tokens_)) {
        return Corrupt("a holder's block %d is node %d, which caches other tokens", b, n);
      }
    }
  }
  for (NodeId n = 0; n < static_cast<NodeId>(nodes_.size()); ++n) {
    if (nodes_[n].live && nodes_[n].holders != held[n]) {
      return Corrupt("node %d counts %d holders, %d name it", n, nodes_[n].holders, held[n]);
    }
  }
  return absl::OkStatus();
}

}  // namespace internal
}  // namespace kvmem
