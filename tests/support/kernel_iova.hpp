// A literal transcription of Linux drivers/iommu/iova.c (mainline, the rbtree allocator with
// cached nodes and the magazine rcaches of one CPU): the reference the tests check
// IovaAllocator against, address for address. An ordered map of pfn_lo stands in for the
// rbtree; rb_prev()/rb_next() are iterator steps. No fast path, no laziness: each function
// is the kernel's, statement for statement, and names it.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <map>
#include <vector>

namespace physr::testing {

class KernelIovaDomain {
 public:
  static constexpr uint64_t kAnchor = ~uint64_t{0};  // IOVA_ANCHOR
  static constexpr unsigned kRangeCacheMaxSize = 6;  // IOVA_RANGE_CACHE_MAX_SIZE
  static constexpr unsigned kMagSize = 127;          // IOVA_MAG_SIZE

  // init_iova_domain() (+ iova_domain_init_rcaches(), one CPU).
  KernelIovaDomain(unsigned shift, uint64_t start_pfn) : start_pfn_(start_pfn) {
    dma_32bit_pfn_ = uint64_t{1} << (32 - shift);
    max32_alloc_size_ = dma_32bit_pfn_;
    anchor_ = tree_.emplace(kAnchor, kAnchor).first;
    cached_node_ = cached32_node_ = anchor_;
  }

  // alloc_iova_fast(iovad, size, limit_pfn, flush_rcache = true); 0 on failure.
  uint64_t alloc_iova_fast(uint64_t size, uint64_t limit_pfn) {
    bool flush_rcache = true;
    if (size < (1u << (kRangeCacheMaxSize - 1))) size = std::bit_ceil(size);
    if (uint64_t pfn = iova_rcache_get(size, limit_pfn + 1)) return pfn;
  retry:
    uint64_t pfn;
    if (!alloc_iova(size, limit_pfn, &pfn)) {
      if (!flush_rcache) return 0;
      flush_rcache = false;
      free_cpu_cached_iovas();
      free_global_cached_iovas();
      goto retry;
    }
    return pfn;
  }

  // free_iova_fast()
  void free_iova_fast(uint64_t pfn, uint64_t size) {
    if (iova_rcache_insert(pfn, size)) return;
    free_iova(pfn);
  }

  // alloc_iova(iovad, size, limit_pfn, size_aligned = true)
  bool alloc_iova(uint64_t size, uint64_t limit_pfn, uint64_t* pfn) {
    return alloc_and_insert_iova_range(size, limit_pfn + 1, pfn);
  }

  // free_iova(): finds the iova containing pfn and removes it.
  void free_iova(uint64_t pfn) {
    auto it = private_find_iova(pfn);
    if (it != tree_.end()) remove_iova(it);
  }

  // reserve_iova()
  void reserve_iova(uint64_t pfn_lo, uint64_t pfn_hi) {
    bool overlap = false;
    for (auto node = tree_.begin(); node != tree_.end(); ++node) {
      if (pfn_lo <= node->second && pfn_hi >= node->first) {  // __is_range_overlap()
        // __adjust_overlap_range(): the node's pfn_lo may move down (the rbtree node keeps
        // its place; the map needs the key changed).
        if (pfn_lo < node->first) {
          auto nh = tree_.extract(node);
          nh.key() = pfn_lo;
          node = tree_.insert(std::move(nh)).position;
        }
        if (pfn_hi > node->second) pfn_lo = node->second + 1;
        if (pfn_lo >= node->first && pfn_hi <= node->second) return;
        overlap = true;
      } else if (overlap) {
        break;
      }
    }
    tree_.emplace(pfn_lo, pfn_hi);  // __insert_new_range()
  }

  // iova_depot_work_func() for one size class.
  void iova_depot_work_func(unsigned log_size, unsigned online_cpus) {
    Rcache& rc = rcaches_[log_size];
    if (rc.depot.size() > online_cpus) {
      Magazine mag = rc.depot.back();
      rc.depot.pop_back();
      iova_magazine_free_pfns(mag);
    }
  }

  uint64_t depot_size(unsigned log_size) const { return rcaches_[log_size].depot.size(); }

 private:
  using Tree = std::map<uint64_t, uint64_t>;  // pfn_lo -> pfn_hi
  struct Magazine {
    std::vector<uint64_t> pfns;
  };
  struct Rcache {
    Magazine loaded, prev;   // the one CPU's iova_cpu_rcache
    std::vector<Magazine> depot;  // a stack: iova_depot_push() / iova_depot_pop()
  };

  static unsigned fls_long(uint64_t x) { return static_cast<unsigned>(std::bit_width(x)); }
  static unsigned order_base_2(uint64_t x) { return x <= 1 ? 0 : fls_long(x - 1); }

  // __get_cached_rbnode()
  Tree::iterator get_cached_rbnode(uint64_t limit_pfn) {
    if (limit_pfn <= dma_32bit_pfn_) return cached32_node_;
    return cached_node_;
  }

  // __cached_rbnode_insert_update()
  void cached_rbnode_insert_update(Tree::iterator n) {
    if (n->second < dma_32bit_pfn_)
      cached32_node_ = n;
    else
      cached_node_ = n;
  }

  // __cached_rbnode_delete_update()
  void cached_rbnode_delete_update(Tree::iterator free) {
    auto cached_iova = cached32_node_;
    if (free == cached_iova || (free->second < dma_32bit_pfn_ && free->first >= cached_iova->first))
      cached32_node_ = std::next(free);
    if (free->first < dma_32bit_pfn_) max32_alloc_size_ = dma_32bit_pfn_;
    cached_iova = cached_node_;
    if (free->first >= cached_iova->first) cached_node_ = std::next(free);
  }

  // iova_find_limit(): the rbtree descent ends on the lowest node whose pfn_hi reaches
  // limit_pfn, or on its successor when that node straddles limit_pfn (which one depends
  // on the tree's shape); the walk from either computes the same address. This takes the
  // former.
  Tree::iterator iova_find_limit(uint64_t limit_pfn) {
    if (limit_pfn > dma_32bit_pfn_) return anchor_;
    auto node = tree_.lower_bound(limit_pfn);
    if (node != tree_.begin() && std::prev(node)->second >= limit_pfn) --node;
    return node;
  }

  // __alloc_and_insert_iova_range(iovad, size, limit_pfn, new, size_aligned = true)
  bool alloc_and_insert_iova_range(uint64_t size, uint64_t limit_pfn, uint64_t* out) {
    Tree::iterator curr, prev;
    bool have_curr;
    uint64_t new_pfn, retry_pfn;
    uint64_t align_mask = ~uint64_t{0};
    uint64_t high_pfn = limit_pfn, low_pfn = start_pfn_;

    align_mask <<= fls_long(size - 1);

    if (limit_pfn <= dma_32bit_pfn_ && size >= max32_alloc_size_) return false;  // iova32_full

    curr = get_cached_rbnode(limit_pfn);
    retry_pfn = curr->second;

  retry:
    do {
      high_pfn = std::min(high_pfn, curr->first);
      new_pfn = (high_pfn - size) & align_mask;
      prev = curr;
      have_curr = curr != tree_.begin();  // curr = rb_prev(curr)
      if (have_curr) --curr;
    } while (have_curr && new_pfn <= curr->second && new_pfn >= low_pfn);

    if (high_pfn < size || new_pfn < low_pfn) {
      if (low_pfn == start_pfn_ && retry_pfn < limit_pfn) {
        high_pfn = limit_pfn;
        low_pfn = retry_pfn + 1;
        curr = iova_find_limit(limit_pfn);
        goto retry;
      }
      max32_alloc_size_ = size;
      return false;  // iova32_full
    }

    // iova_insert_rbtree(&iovad->rbroot, new, prev): prev is the node just above.
    auto n = tree_.emplace_hint(prev, new_pfn, new_pfn + size - 1);
    cached_rbnode_insert_update(n);
    *out = new_pfn;
    return true;
  }

  // private_find_iova()
  Tree::iterator private_find_iova(uint64_t pfn) {
    auto it = tree_.upper_bound(pfn);
    if (it == tree_.begin()) return tree_.end();
    --it;
    return pfn <= it->second ? it : tree_.end();
  }

  // remove_iova()
  void remove_iova(Tree::iterator it) {
    cached_rbnode_delete_update(it);
    tree_.erase(it);
  }

  // iova_magazine_free_pfns()
  void iova_magazine_free_pfns(Magazine& mag) {
    for (uint64_t pfn : mag.pfns) {
      auto it = private_find_iova(pfn);
      if (it != tree_.end()) remove_iova(it);
    }
    mag.pfns.clear();
  }

  // iova_magazine_pop(): the topmost entry at or below limit_pfn, or none.
  static uint64_t iova_magazine_pop(Magazine& mag, uint64_t limit_pfn) {
    size_t i;
    for (i = mag.pfns.size() - 1; mag.pfns[i] > limit_pfn; i--)
      if (i == 0) return 0;
    const uint64_t pfn = mag.pfns[i];
    mag.pfns[i] = mag.pfns.back();
    mag.pfns.pop_back();
    return pfn;
  }

  // __iova_rcache_insert()
  bool iova_rcache_insert(uint64_t pfn, uint64_t size) {
    const unsigned log_size = order_base_2(size);
    if (log_size >= kRangeCacheMaxSize) return false;
    Rcache& rc = rcaches_[log_size];
    if (rc.loaded.pfns.size() == kMagSize) {
      if (rc.prev.pfns.size() != kMagSize) {
        std::swap(rc.prev, rc.loaded);
      } else {
        rc.depot.push_back(std::move(rc.loaded));  // iova_depot_push()
        rc.loaded = Magazine{};
      }
    }
    rc.loaded.pfns.push_back(pfn);
    return true;
  }

  // iova_rcache_get() + __iova_rcache_get()
  uint64_t iova_rcache_get(uint64_t size, uint64_t limit_pfn) {
    const unsigned log_size = order_base_2(size);
    if (log_size >= kRangeCacheMaxSize) return 0;
    Rcache& rc = rcaches_[log_size];
    bool has_pfn = false;
    if (!rc.loaded.pfns.empty()) {
      has_pfn = true;
    } else if (!rc.prev.pfns.empty()) {
      std::swap(rc.prev, rc.loaded);
      has_pfn = true;
    } else if (!rc.depot.empty()) {
      rc.loaded = std::move(rc.depot.back());  // iova_depot_pop()
      rc.depot.pop_back();
      has_pfn = true;
    }
    return has_pfn ? iova_magazine_pop(rc.loaded, limit_pfn - size) : 0;
  }

  // free_cpu_cached_iovas() for the one CPU
  void free_cpu_cached_iovas() {
    for (Rcache& rc : rcaches_) {
      iova_magazine_free_pfns(rc.loaded);
      iova_magazine_free_pfns(rc.prev);
    }
  }

  // free_global_cached_iovas()
  void free_global_cached_iovas() {
    for (Rcache& rc : rcaches_) {
      while (!rc.depot.empty()) {
        Magazine mag = std::move(rc.depot.back());
        rc.depot.pop_back();
        iova_magazine_free_pfns(mag);
      }
    }
  }

  Tree tree_;
  Tree::iterator anchor_, cached_node_, cached32_node_;
  uint64_t start_pfn_, dma_32bit_pfn_, max32_alloc_size_;
  Rcache rcaches_[kRangeCacheMaxSize];
};

}  // namespace physr::testing
