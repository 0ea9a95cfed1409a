// PrefixIndex: the prefix cache's index (docs/prefix_cache.md). A tree of blocks of
// block_tokens token ids, one tree per salt: a node is one cached block, found from its
// parent by the block's tokens, and pins one page of the layout (which holds the K/V of
// exactly those tokens after exactly that prefix). Look-ups go down the tree by a 64-bit
// chained key (parent key, tokens) in one hash map; keys that collide are told apart by
// comparing the parent and the tokens exactly, so a collision costs time, never a wrong
// hit. Each node also carries its stable SHA-256 block hash, for the events.
//
// Holders: what a request has published or matched (its tokens and the node of each of
// its full blocks). A node that some holder names, or whose page a live row holds, is
// never evicted; the others are evicted leaf first, lowest priority first, least
// recently used first (a std::set of the leaves).
//
// The index changes no page itself: it says which pages to pin and unpin, and KvCache
// does that on the layout. Not thread-safe: KvCache calls it under its mutex.
#ifndef KVMEM_SRC_CACHE_PREFIX_INDEX_H_
#define KVMEM_SRC_CACHE_PREFIX_INDEX_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "kvmem/prefix_cache.h"

namespace kvmem::internal {

class PrefixIndex {
 public:
  using NodeId = int32_t;
  // The 64-bit key of a block from its parent's key and its tokens (tests pass one that
  // collides on purpose).
  using KeyHash = uint64_t (*)(uint64_t parent_key, absl::Span<const int32_t> tokens);

  // What one request has published or matched.
  struct Holder {
    bool bound = false;  // the salt is fixed (AddRequestWithPrefix, or a first publish)
    std::string salt;
    int32_t priority = 0;
    std::vector<int32_t> tokens;  // its published tokens: a prefix of the request's
    std::vector<NodeId> chain;    // the node of each full block of `tokens`
  };

  // What PublishTokens will do, decided before anything changes: for each block from
  // the holder's chain on, the existing node with those tokens (-1: a new node pinning
  // the row's page).
  struct PublishPlan {
    std::vector<NodeId> existing;
  };

  struct Counters {
    int64_t lookups = 0;
    int64_t lookup_tokens = 0;
    int64_t hit_tokens = 0;
    int64_t stored_blocks = 0;
    int64_t evicted_blocks = 0;
    int64_t events_dropped = 0;
  };

  // REQUIRES: block_tokens >= 1.
  explicit PrefixIndex(int64_t block_tokens, KeyHash key_hash = nullptr);

  int64_t block_tokens() const { return block_tokens_; }
  int64_t num_blocks() const { return live_nodes_; }
  const Counters& counters() const { return counters_; }
  Counters& counters() { return counters_; }
  int32_t page(NodeId n) const { return nodes_[n].page; }

  // The nodes of the longest cached prefix of `tokens` under `salt`, in whole blocks,
  // into *out (cleared first). Changes nothing.
  void Match(absl::Span<const int32_t> tokens, absl::string_view salt,
             std::vector<NodeId>* out) const;

  // A new request starts on `nodes` (from Match of `tokens`): its holder names them,
  // they are used now, and they keep at least its priority.
  void Attach(Holder* h, absl::Span<const NodeId> nodes, absl::Span<const int32_t> tokens);
  // A forked request names what its parent names.
  void Copy(const Holder& from, Holder* to);
  // A request ends: its nodes are used now and no longer named by it.
  void Detach(Holder* h);
  // A request is rewound to `new_len` tokens: it publishes no token beyond.
  void Clip(Holder* h, int64_t new_len);

  // InvalidArgument, with nothing changed, for a publish that contradicts the holder's:
  // a different salt, tokens that differ from those published before, more tokens than
  // the request's `length`, or a block whose row page already caches other tokens.
  // `row_pages`: the request's pages (at least one per full block of `tokens`).
  absl::Status PlanPublish(const Holder& h, absl::string_view salt,
                           absl::Span<const int32_t> tokens, int64_t length,
                           absl::Span<const int32_t> row_pages, PublishPlan* plan) const;
  // Applies a plan of PlanPublish (same arguments): new nodes and their events; the
  // pages to pin are appended to *pin.
  void CommitPublish(Holder* h, absl::string_view salt, absl::Span<const int32_t> tokens,
                     absl::Span<const int32_t> row_pages, const PublishPlan& plan,
                     std::vector<int32_t>* pin);

  // Pages that repeated EvictOne(idle) would give back: nodes that no holder names,
  // whose page is idle, and whose descendants are all such nodes. O(nodes): for the
  // slow path of an allocation only.
  int64_t EvictablePages(const std::function<bool(int32_t page)>& idle) const;

  // Evicts the first evictable leaf (lowest priority, then least recently used) whose
  // page `idle` says no live row holds; returns its page (to unpin), or -1 when none.
  int32_t EvictOne(const std::function<bool(int32_t page)>& idle);

  // Moves the pending events into *out (appended).
  void TakeEvents(std::vector<PrefixEvent>* out);

  // Internal unless the tree, the key map, the leaf set, the page map and the holders'
  // references agree; `pinned(page)` must hold for every node's page, and
  // `pinned_pages` must be the count of nodes.
  absl::Status CheckConsistency(absl::Span<const Holder* const> holders,
                                const std::function<bool(int32_t)>& pinned,
                                int64_t pinned_pages) const;

 private:
  struct Node {
    bool live = false;
    NodeId parent = -1;  // -1 for a root
    int32_t page = -1;   // -1 for a root
    uint64_t key = 0;
    NodeId next_same_key = -1;  // the next node whose key collides with this one's
    int32_t children = 0;
    int32_t holders = 0;
    int32_t priority = 0;
    uint64_t tick = 0;
    BlockHash hash{};
    std::string salt;  // roots only
  };
  using LeafKey = std::tuple<int32_t, uint64_t, NodeId>;  // priority, tick, node

  absl::Span<const int32_t> TokensOf(NodeId n) const {
    return absl::MakeConstSpan(tokens_).subspan(static_cast<size_t>(n) * block_tokens_,
                                                block_tokens_);
  }
  uint64_t KeyOf(uint64_t parent_key, absl::Span<const int32_t> tokens) const;
  NodeId FindRoot(absl::string_view salt) const;
  NodeId FindChild(NodeId parent, absl::Span<const int32_t> tokens) const;
  NodeId NewNode();
  bool IsLeaf(const Node& n) const { return n.parent >= 0 && n.children == 0; }
  void Touch(NodeId n, int32_t priority);
  void EraseLeaf(NodeId n);
  void InsertLeaf(NodeId n);
  void Unlink(NodeId n);  // from the key map
  void PushEvent(PrefixEvent::Kind kind, const Node& n);

  const int64_t block_tokens_;
  const KeyHash key_hash_;
  std::vector<Node> nodes_;
  std::vector<int32_t> tokens_;  // [node][block_tokens]
  std::vector<NodeId> free_nodes_;
  int64_t live_nodes_ = 0;                        // non-root nodes
  absl::flat_hash_map<uint64_t, NodeId> by_key_;  // first node of each key
  absl::flat_hash_map<std::string, NodeId> roots_;
  absl::flat_hash_map<int32_t, NodeId> by_page_;
  std::set<LeafKey> leaves_;
  uint64_t tick_ = 0;
  uint64_t next_sequence_ = 1;
  std::deque<PrefixEvent> events_;
  Counters counters_;
};

}  // namespace kvmem::internal

#endif  // KVMEM_SRC_CACHE_PREFIX_INDEX_H_
