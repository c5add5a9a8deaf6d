// physr sim: the machine model. The PCIe fabric and its timing (Fabric, Simulator); the
// machine (Machine: the model's platform with RAM and every P2P BAR as real bytes, IOMMU
// domains and DMA devices) and its device side, which decodes every DMA address as the
// fabric does; fio-like jobs that move and verify real bytes through the DMA layer (NVMe
// SSDs, GPU and accelerator copy engines, NIC-to-NIC packets, O_DIRECT copies, devices
// working on a process's memory through an HMM mirror); scenario files; and the
// runner that runs a scenario's jobs on its machine, one after another or at once
// (fio's groups and stonewall: the jobs of a group share one fabric clock).
//
// Design rationale
// - Resources, not packets: every PCIe link direction, every root complex's peer-forwarding
//   engine, every socket's memory controller and every inter-socket link direction is a
//   resource with a bandwidth. A transfer is a flow over the resources of its route, and
//   flows share each resource max-min fairly (progressive filling), recomputed whenever a
//   flow starts or ends. That is exact for the steady state TLP-level simulators converge
//   to, at a cost per event instead of per 256-byte packet.
// - Routes follow the P2P verdicts of the pci module: bus_addr traffic turns around at the
//   common switch and never reaches the root complex; thru_host_bridge traffic (ACS
//   redirect, or peers under different root ports) goes up to the root complex, through
//   its forwarding engine (usually slower than its links) and down again; not_supported is
//   an unsupported request and the transfer fails. Host memory traffic goes up to the root
//   complex, across the inter-socket link when the memory is on the other socket, and into
//   that socket's memory controller.
// - A link is the one between a downstream port (root port, switch downstream port) and
//   the upstream port below it (switch upstream port, endpoint); its generation and width
//   come from the machine, else from defaults (docs/sim.md gives the sources).
// - The device side trusts no segment flag of the DMA layer: every DMA address is decoded
//   as the fabric would (a peer's BAR under a common switch by bus address, else up
//   through the IOMMU or the DMA offset to the root complex), so every simulated transfer
//   tests the addresses map() produced, and a job times each I/O over the route its
//   addresses took.
// - Deterministic: no wall clock; the SSDs' latency draws and random offsets come from
//   MachineOptions::seed, so the same inputs and seed give the same times.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "physr/builtin.hpp"
#include "physr/core.hpp"
#include "physr/dma.hpp"
#include "physr/mem.hpp"
#include "physr/pci.hpp"
#include "physr/model.hpp"
#include "physr/platform.hpp"

namespace physr::sim {

/// Parameters not in the topology, with documented defaults (docs/sim.md).
struct FabricOptions {
  double default_link_gts = 16.0;       // PCIe 4.0, when a link's speed is unknown
  unsigned default_link_width = 16;     // when a link's width is unknown
  double rc_p2p_gbps = 12.0;            // root complex peer forwarding, GB/s per root complex
  double memory_gbps = 100.0;           // per socket (memory controller), GB/s
  double inter_socket_gbps = 20.0;      // per direction, GB/s
  double switch_latency_ns = 150.0;     // per switch crossed
  double rc_latency_ns = 300.0;         // through a root complex
  double memory_latency_ns = 90.0;      // host memory access
  double inter_socket_latency_ns = 120.0;
};

/// Bytes per nanosecond (= GB/s) of a PCIe link: GT/s x lanes x encoding efficiency / 8
/// (8b/10b up to 5 GT/s, 128b/130b up to 32 GT/s, FLIT mode 242/256 above).
double pcie_link_gbps(double gts, unsigned width);

/// One shared resource of the fabric.
struct Resource {
  enum class Kind : uint8_t { link_up, link_down, rc_forward, memory, inter_socket, device };
  Kind kind;
  std::string name;   // "0000:03:00.0 up", "rc pci0000:00", "memory node 0", "socket 0->1"
  double gbps = 0;    // bytes per ns
  uint64_t bytes = 0; // moved so far
  double moved = 0;   // the same before rounding (flows move fractional bytes per event)
};

/// Where a transfer goes: the resources it crosses and its latency.
struct Route {
  std::vector<uint32_t> resources;
  double latency_ns = 0;
  bool through_rc = false;      // crosses a root complex's peer forwarding
  bool host_memory = false;     // reads or writes host memory
  pci::MapType p2p = pci::MapType::not_supported;  // for peer routes: the verdict it follows
};

/// The fabric of one machine.
class Fabric {
 public:
  /// A fabric with a P2P engine of its own; `topo` must outlive it. EINVAL for bandwidths
  /// or link speeds in the options that are not positive and finite, or a default link
  /// width of 0.
  static Result<Fabric> create(const pci::Topology& topo, const FabricOptions& options = {});
  /// A fabric on a shared P2P engine (a platform's), which must outlive it.
  static Result<Fabric> create(const pci::P2PEngine& engine, const FabricOptions& options = {});

  /// Between a function and host memory on a NUMA node (-1: the function's own node).
  /// `device_writes`: data flows from the device to memory (up its link), else down.
  Result<Route> to_memory(uint32_t function, int numa_node = -1, bool device_writes = true) const;
  /// From a function (the DMA initiator) to a peer's BAR; `initiator_writes` says which
  /// way the data flows. EREMOTEIO (an unsupported request) when the root complex refuses
  /// peer traffic for this pair.
  Result<Route> to_peer(uint32_t initiator, uint32_t target, bool initiator_writes = true) const;
  /// The same, but through the root complex whatever the verdict (where a request goes
  /// when no switch below turns it around). EREMOTEIO when the root complex does not
  /// forward peer traffic for this pair.
  Result<Route> to_peer_via_rc(uint32_t initiator, uint32_t target, bool initiator_writes = true) const;
  /// Whether the root complex forwards peer traffic from `initiator` to `target`'s BAR:
  /// an AMD Zen CPU, or host bridges on the allowlist (as Linux decides thru_host_bridge).
  bool rc_forwards(uint32_t initiator, uint32_t target) const;
  /// Zeroes every resource's byte counters, so they count one run's traffic.
  void reset_counters() noexcept {
    for (Resource& r : res_) r.bytes = 0, r.moved = 0;
  }
  /// Adds a resource outside the PCIe tree (a copy engine, a wire), or returns the one of
  /// that kind and name added before (now with this bandwidth): the jobs of a machine share
  /// it rather than piling up copies. `gbps` must be positive (the
  /// simulator shares out bandwidth and assumes none is negative).
  uint32_t add_resource(Resource::Kind kind, std::string name, double gbps);

  const std::vector<Resource>& resources() const noexcept { return res_; }
  std::vector<Resource>& resources() noexcept { return res_; }
  const pci::Topology& topology() const noexcept { return *topo_; }
  /// The NUMA node of a function (its host bridge's when unknown; 0 when neither says).
  int numa_of(uint32_t function) const;
  /// The machine's distinct NUMA nodes, sorted (at least one).
  const std::vector<int>& numa_nodes() const noexcept { return numa_nodes_; }

 private:
  Fabric() = default;
  uint32_t add(Resource::Kind k, std::string name, double gbps);
  uint32_t inter_socket(int from, int to) const;
  // Resources and latency from `f` up to its root complex (up = toward the root).
  void climb(uint32_t f, std::optional<uint32_t> stop, bool up, Route& r) const;
  // Up from a, across the root complex(es), down to b.
  void through_rc(uint32_t a, uint32_t b, bool initiator_writes, Route& r) const;
  Error unsupported(uint32_t a, uint32_t b) const;

  const pci::Topology* topo_ = nullptr;
  FabricOptions opt_;
  const pci::P2PEngine* engine_ = nullptr;
  std::unique_ptr<pci::P2PEngine> own_engine_;  // when created from a topology
  std::vector<Resource> res_;
  std::vector<int32_t> link_up_, link_down_;  // per function: its upstream link, -1 when it has none
  std::vector<uint32_t> rc_fwd_;              // per host bridge
  std::vector<int> numa_nodes_;               // distinct nodes, sorted
  std::vector<uint32_t> memory_;              // per entry of numa_nodes_
  std::vector<std::vector<uint32_t>> socket_link_;  // [from][to] index into res_
};

/// Flow-level discrete-event simulation over a fabric's resources.
class Simulator {
 public:
  explicit Simulator(Fabric& fabric) : fabric_(&fabric) {}

  /// Adds a transfer of `bytes` over `route`, submitted at `at_ns`; its data starts moving
  /// after the route's latency. `owner` tags it (the job of a group it belongs to; see
  /// owner()). Returns its index.
  size_t add(const Route& route, uint64_t bytes, double at_ns, uint32_t owner = 0);
  /// The owner a transfer was added with (until it is released).
  uint32_t owner(size_t flow) const { return flows_[flow].owner; }
  /// Gives back the record of a finished transfer the caller asks nothing more about: a
  /// later add() may return its index again, so memory stays bounded by the transfers in
  /// flight however many a run makes.
  void release(size_t flow) { free_.push_back(flow); }
  /// Runs until every transfer has finished; returns the time of the last completion.
  double run();
  /// Runs to the next completion (later transfers may still be added) and returns the
  /// transfers that completed then; empty when nothing is left to run.
  std::vector<size_t> step();
  /// Moves the clock to `t_ns` (later transfers are added from there), running whatever
  /// completes on the way; returns the transfers that completed.
  std::vector<size_t> idle_until(double t_ns);
  /// step() and idle_until() into `done` (cleared first), whose capacity a caller's loop
  /// keeps from one event to the next.
  void step(std::vector<size_t>& done);
  void idle_until(double t_ns, std::vector<size_t>& done);
  /// Transfers added and not yet finished.
  size_t in_flight() const noexcept { return active_.size() + (order_.size() - next_); }
  /// Completion time of a transfer (after run()).
  double finish_ns(size_t flow) const { return flows_[flow].finish; }
  double submit_ns(size_t flow) const { return flows_[flow].submit; }
  /// Events processed (flow starts and completions), for the benchmarks.
  uint64_t events() const noexcept { return events_; }
  double now() const noexcept { return now_; }

 private:
  struct Flow {
    std::vector<uint32_t> res;
    double submit = 0, start = 0, finish = -1;
    double remaining = 0, rate = 0;
    uint64_t bytes = 0;
    uint32_t owner = 0;
  };
  void allocate_rates(const std::vector<size_t>& active);
  bool advance(double horizon, std::vector<size_t>& done);

  Fabric* fabric_;
  std::vector<Flow> flows_;
  double now_ = 0;
  uint64_t events_ = 0;
  std::vector<size_t> order_;   // flows not yet started, by start time from next_
  size_t next_ = 0;
  std::vector<size_t> active_;  // flows moving data
  std::vector<size_t> free_;    // released flows, reused by add()
  // allocate_rates()' scratch, by resource: remaining capacity, unfrozen flows (zero
  // between calls), and the resources the active flows cross.
  std::vector<double> cap_;
  std::vector<uint32_t> users_, touched_;
};

// -------------------------------------------------------------------------------------
// The machine: memory, providers, IOMMU domains, devices that move real bytes

struct MachineOptions {
  FabricOptions fabric;
  uint64_t ram = 64 * GiB;      // host RAM: [0, 2 GiB) and from 4 GiB up (the 32-bit MMIO hole between)
  bool iommu = true;            // one IOMMU domain per device; false: direct mapping
  uint64_t bounce_pool = 64 * MiB;
  bool dma_debug = true;        // DMA-API debug on every device: mappings shadow-tracked, leaks reported
  // NVMe SSD parameters (docs/sim.md gives the sources of the defaults).
  double nvme_read_gbps = 6.8, nvme_write_gbps = 4.0;
  double nvme_read_latency_ns = 80'000, nvme_write_latency_ns = 20'000;  // a command's median device latency
  // Commands per second the SSD completes at most (4 KiB random, a data-centre PCIe 4.0 SSD):
  // each command holds the media for max(bs / bandwidth, 1 / IOPS).
  double nvme_read_iops = 1'000'000, nvme_write_iops = 300'000;
  // A command's device latency is log-normal around its median: latency x exp(sigma x Z), Z a
  // standard normal drawn from `seed`, the job and the command (0: every command takes the
  // median, the fabric's timing alone).
  double nvme_latency_sigma = 0.3;
  uint64_t seed = 1;  // the latency draws and random offsets: the same seed gives the same report
  double copy_engine_gbps = 20.0;  // a GPU's copy engine (copy jobs, and staging host <-> BAR)
  double copy_engine_latency_ns = 2000;  // from a copy's submission to its first byte
  // The wire between two NICs.
  double wire_gbps = 12.5;         // 100 Gb/s Ethernet
  double wire_latency_ns = 1000;   // cable, PHYs and the NICs' pipelines
};

using physr::Aperture;

/// An access the IOMMU refused: recorded, and no byte moved.
struct IommuFault {
  uint32_t device;
  DmaAddr addr;
  bool write;
  std::string why;
};

/// One bus error of a DMA access (QEMU's MEMTX_DECODE_ERROR, MEMTX_ACCESS_ERROR bits).
enum class BusError : uint8_t {
  decode_error = 1,         // no memory or BAR decodes the address
  iommu_fault = 2,          // the device's IOMMU domain has no mapping with that permission
  unsupported_request = 4,  // a peer's BAR reached through a root complex that does not forward peer traffic
};
/// The bus outcome of one DMA access (QEMU's MemTxResult): data, not an error. The set of
/// errors met, OR'ed over the pieces an access splits into; empty (kBusOk) when none.
using BusResult = Flags<BusError>;
inline constexpr BusResult kBusOk{};
inline constexpr BusResult kBusDecodeError = BusError::decode_error;
inline constexpr BusResult kBusIommuFault = BusError::iommu_fault;
inline constexpr BusResult kBusUnsupportedRequest = BusError::unsupported_request;
/// "ok", or the outcomes set, joined by '|' ("decode_error|iommu_fault").
std::string bus_result_name(BusResult r);

/// What one DMA access did on the fabric, decoded from its addresses alone (never from the
/// DMA segments' flags): its outcome, and where its bytes went, for the timing.
struct DmaAccess {
  BusResult result = kBusOk;
  bool host_memory = false;  // bytes went to or from host RAM (through the root complex)
  bool peer_switch = false;  // to or from a peer's BAR, turned around below the root complex
  bool peer_rc = false;      // to or from a peer's BAR through the root complex
  uint32_t peer = pci::kNoFunction;  // the owner of the BAR reached
  std::string why;           // the first failing piece, when result is not ok
  bool ok() const noexcept { return result.empty(); }
  /// Merges another access of the same transfer (a later burst).
  void merge(const DmaAccess& o);
};

/// Host RAM for the jobs' buffers, machine-wide: per NUMA node an arena of the RAM above
/// 4 GiB (split evenly between the nodes, 2 MiB aligned), from which every job takes its
/// host buffers and to which it gives them back at its end, so jobs that run at once get
/// disjoint buffers. Page granular and physically contiguous, first fit at the asked
/// alignment, as dma_alloc_coherent() hands out large buffers from a contiguous area
/// (Linux mm/cma.c cma_range_alloc(): the first free run of the bitmap at the alignment,
/// bitmap_find_next_zero_area_off()); a node
/// whose arena is full falls back to the other nodes in order, as the page allocator's
/// zonelist does (the timing still takes the device's own node). Not thread-safe (jobs run
/// on one thread).
class HostAllocator {
 public:
  /// Arenas over `ram` (2 MiB aligned, non-empty) split between `nodes` (sorted, distinct,
  /// at least one). EINVAL otherwise.
  static Result<HostAllocator> create(PhysSpan ram, std::vector<int> nodes);
  /// `bytes` (rounded up to 4 KiB) at an `align` (a power of two, at least 4 KiB) from
  /// `node`'s arena, else the next node's that has room; recorded for `owner`. ENOMEM
  /// naming owner, the size and what is free; EINVAL for a zero size, a bad alignment or an
  /// unknown node.
  Result<PhysSpan> alloc(uint64_t bytes, int node, const std::string& owner, uint64_t align = 4096);
  /// Gives a span back (exactly as alloc() returned it); free runs coalesce. EINVAL naming
  /// the span when it is not one handed out (a double free, a part of one).
  Status free(PhysSpan span);
  /// Bytes handed out and not yet given back (0 between jobs).
  uint64_t allocated() const noexcept { return allocated_; }
  /// The spans handed out now with their owners, by address.
  std::vector<std::pair<PhysSpan, std::string>> live() const;
  /// The arena of `node` (empty span for an unknown node).
  PhysSpan arena(int node) const noexcept;

 private:
  struct Arena {
    int node;
    PhysSpan span;
    std::map<uint64_t, uint64_t> free;  // base -> size of each free run, coalesced
  };
  std::vector<Arena> arenas_;
  std::map<uint64_t, std::pair<uint64_t, std::string>> used_;  // base -> size, owner
  uint64_t allocated_ = 0;
};

/// A machine built from a topology: the model's platform (RAM and every P2P BAR as real
/// bytes, each BAR a provider with its host bridge's bus offset, a bounce pool, an IOMMU
/// domain per device) and the fabric timing, on the platform's one P2P engine.
class Machine {
 public:
  /// `topo` must outlive the machine. Errors name the problem (overlapping BARs are left
  /// out with a warning instead).
  static Result<std::unique_ptr<Machine>> create(const pci::Topology& topo, const MachineOptions& options = {});
  ~Machine();

  /// The DMA device for a function (created on first use; DMA-API debug as the options say).
  Result<DmaDevice*> device(uint32_t function) { return model_->device(function); }
  /// The function's largest memory BAR as a provider, if it has one.
  const Aperture* largest_bar(uint32_t function) const { return platform().largest_bar(function); }
  const std::deque<Aperture>& apertures() const noexcept { return platform().apertures(); }
  /// Published providers nearest to `clients` (Linux pci_p2pmem_find_many, ties to the
  /// first), or nullptr.
  const Aperture* nearest_provider(std::span<const uint32_t> clients) const { return platform().nearest_provider(clients); }

  /// The device side of DMA: `initiator` writes `data` (or reads into `out`) through a DMA
  /// list, at bytes [offset, offset + size) of it (an engine moves a large I/O in bursts).
  /// Each address is decoded as the fabric would: a peer BAR whose bus range holds it and
  /// that the initiator's switch reaches without the root complex gets it directly;
  /// everything else goes up to the root complex, through the initiator's IOMMU domain
  /// (or its direct DMA offset), and lands in RAM or, if that root complex forwards peer
  /// traffic, in a BAR. Any piece that fails (the DmaAccess's result) moves nothing of
  /// this call; IOMMU faults are also recorded. Errors (not bus outcomes): the list ends
  /// before the data does (EINVAL).
  Result<DmaAccess> dma_write(uint32_t initiator, std::span<const DmaSegment> segs, std::span<const uint8_t> data, uint64_t offset = 0);
  Result<DmaAccess> dma_read(uint32_t initiator, std::span<const DmaSegment> segs, std::span<uint8_t> out, uint64_t offset = 0);
  /// Streaming forms for a device that moves bytes between its media and memory without a
  /// buffer of its own: `source` produces (or `sink` takes) the `len` bytes at list offset
  /// `offset` in place, a piece at a time (`off` counts from `offset`). Same decoding,
  /// outcomes and errors as above; the first error of `source` or `sink` stops the transfer
  /// and is returned.
  using DmaSource = std::function<Status(uint64_t off, std::span<uint8_t> dst)>;
  using DmaSink = std::function<Status(uint64_t off, std::span<const uint8_t> src)>;
  Result<DmaAccess> dma_write_from(uint32_t initiator, std::span<const DmaSegment> segs, uint64_t offset, uint64_t len,
                                   const DmaSource& source);
  Result<DmaAccess> dma_read_to(uint32_t initiator, std::span<const DmaSegment> segs, uint64_t offset, uint64_t len,
                                const DmaSink& sink);

  /// What a DmaDevice needs to map on this machine (for devices configured by the caller).
  DmaEnv dma_env() noexcept { return platform().dma_env(); }
  Platform& platform() noexcept { return model_->platform(); }
  const Platform& platform() const noexcept { return model_->platform(); }
  ModelPlatform& model() noexcept { return *model_; }
  PhysMemory& memory() noexcept { return model_->memory(); }
  const PhysMemory& memory() const noexcept { return model_->memory(); }
  ProviderRegistry& providers() noexcept { return platform().providers(); }
  Fabric& fabric() noexcept { return *fabric_; }
  const Fabric& fabric() const noexcept { return *fabric_; }
  BouncePool& bounce() noexcept { return *platform().bounce(); }
  IoDomain* domain(uint32_t function) { return model_->domain(function); }
  const pci::Topology& topology() const noexcept { return *topo_; }
  const MachineOptions& options() const noexcept { return opt_; }
  const std::vector<IommuFault>& faults() const noexcept { return faults_; }
  /// A new number for each job run on this machine, from 1: the job's data stream, so no
  /// job's bytes equal what an earlier job left in the same buffer.
  uint64_t next_job() noexcept { return ++jobs_; }
  /// Called by the running job as its I/Os complete (`done` of `total` I/Os or packets),
  /// about every 1/256 of the job; unset, nothing is. For progress lines: the job runs on
  /// when it returns.
  std::function<void(uint64_t done, uint64_t total)> on_progress;
  std::vector<std::string> warnings;
  /// Name of a function for reports ("nvme0", or its address).
  std::string label(uint32_t function) const { return platform().label(function); }
  /// The P2P memory pools of the machine's functions (Linux pdev->p2pdma of each device),
  /// created with the machine; a function's pool gets its memory on first allocate_file().
  mem::P2PMemory& p2pmem() noexcept { return *p2pmem_; }
  /// The p2pmem allocate file of `function`: a P2PChunkSource over its pool, which holds
  /// its largest BAR whole (added on first use, as a driver's pci_p2pdma_add_resource() of
  /// its CMB or BAR). Lives as long as the machine. EINVAL: the function has no memory BAR;
  /// add_resource()'s errors otherwise.
  Result<mem::P2PMemorySource*> allocate_file(uint32_t function);
  /// Host RAM for the jobs' buffers (HostAllocator), over the RAM above 4 GiB split between
  /// the fabric's NUMA nodes.
  HostAllocator& host_memory() noexcept { return *host_alloc_; }
  const HostAllocator& host_memory() const noexcept { return *host_alloc_; }

 private:
  Machine() = default;
  struct Run;
  // Decodes [offset, offset + len) of the list into physical runs (all of it first: a
  // failing piece moves nothing), then moves each run through `source` or `sink`.
  Result<DmaAccess> access(uint32_t initiator, std::span<const DmaSegment> segs, uint64_t offset, uint64_t len,
                           const DmaSource* source, const DmaSink* sink);
  // Decodes one piece [dma, dma + len) that lies within one DMA segment.
  void decode(uint32_t initiator, uint64_t dma, uint64_t len, bool write, std::vector<Run>& runs, DmaAccess& out);

  const pci::Topology* topo_ = nullptr;
  MachineOptions opt_;
  std::unique_ptr<ModelPlatform> model_;
  std::unique_ptr<mem::P2PMemory> p2pmem_;  // after model_: goes first
  std::map<uint32_t, std::unique_ptr<mem::P2PMemorySource>> files_;  // after p2pmem_: goes before it
  std::optional<Fabric> fabric_;
  std::optional<HostAllocator> host_alloc_;
  std::vector<IommuFault> faults_;
  std::vector<Run> runs_;  // access()'s scratch
  bool in_access_ = false;  // an access is running (a source or sink may make another)
  uint64_t jobs_ = 0;
};

// -------------------------------------------------------------------------------------
// Jobs: fio-like workloads on NVMe SSDs, GPU and accelerator copy engines, and NICs

enum class PathPolicy : uint8_t { p2p, bounce, automatic };
const char* path_policy_name(PathPolicy p) noexcept;

/// An NVMe job: the SSD reads its namespace into the buffers (write = false) or writes the
/// buffers into it, one command per block.
struct NvmeJob {
  uint32_t ssd = 0;
  bool write = false;
  /// The function whose largest BAR holds the buffers (the SSD's own CMB included); unset:
  /// host memory.
  std::optional<uint32_t> buffer_function;
  PathPolicy path = PathPolicy::automatic;
  /// The command for I/O i addresses block perm(i) of the namespace, perm a seeded
  /// permutation (fio's randread/randwrite with its random map: every block once).
  bool random = false;
};

/// A copy-engine job: a GPU's or accelerator's engine copies between its own memory (its
/// largest BAR) and the buffers: write = false copies device memory into the buffers.
struct CopyJob {
  uint32_t device = 0;
  bool write = false;
  /// The function whose largest BAR holds the buffers (not `device`); unset: host memory.
  std::optional<uint32_t> buffer_function;
  PathPolicy path = PathPolicy::automatic;  // p2p or automatic: staging is for SSDs
};

/// A network job: `sender` sends packets from its TX buffers over the wire to `receiver`,
/// which receives them into its RX buffers.
struct NetJob {
  uint32_t sender = 0, receiver = 0;
  /// Where each side's buffers are (a function's largest BAR); unset: host memory.
  std::optional<uint32_t> tx_buffer_function, rx_buffer_function;
  PathPolicy path = PathPolicy::automatic;
  /// How the receiver takes packets in (docs/sim.md, "Devmem receive"): into its RX
  /// buffers (plain); with header split into page pools, headers into host pages and
  /// payloads into net_iovs of rx_buffer_function's BAR exported as a dma-buf and bound
  /// to the receiver (devmem); or into host page-pool pages and then copied by
  /// rx_buffer_function's copy engine into its BAR (copy: the path without devmem).
  enum class Rx : uint8_t { plain, devmem, copy } rx = Rx::plain;
  /// How the sender sends (docs/sim.md, "Devmem transmit"): from its TX buffers (plain), or
  /// as devmem TX does, each packet's header from host memory and its payload straight from
  /// net_iovs of tx_buffer_function's BAR exported as a dma-buf and bound to the sender for
  /// TX (devmem; the receiver takes the packets into host memory, rx plain).
  enum class Tx : uint8_t { plain, devmem } tx = Tx::plain;
  uint32_t header_bytes = 128;  // devmem (RX or TX): the bytes of each packet in the header buffer
  double wire_gbps = 0;         // the wire's rate for this job, GB/s (0: MachineOptions::wire_gbps)
};

/// An O_DIRECT copy, as p2pmem-test and SPDK's cmb_copy do it: a process maps its buffers
/// (mmap of `buffer_function`'s p2pmem allocate file, AddressSpace::mmap_p2p, or anonymous
/// host memory), then for each block reads `ssd` into a buffer with O_DIRECT and writes the
/// buffer to `target` with O_DIRECT: pinning (FOLL_PCI_P2PDMA iff the queue has
/// BLK_FEAT_PCI_P2PDMA), bios and requests (mem::direct_io), each request's segments mapped
/// by the SSD's DmaDevice and moved over the fabric. Every byte is checked twice: in the
/// buffer after the read, in the target's namespace after the write.
struct DirectIoJob {
  uint32_t ssd = 0;     // read from
  uint32_t target = 0;  // written to (another NVMe SSD)
  /// Whose P2P memory pool the buffers are mapped from (its largest BAR); unset: host memory.
  std::optional<uint32_t> buffer_function;
  /// With a P2P buffer: the first host_bytes of each block's buffer are anonymous host
  /// memory, the rest P2P memory right after it, so one I/O mixes both (a 4 KiB multiple
  /// below the block size; 0: all P2P).
  uint64_t host_bytes = 0;
  /// The queues have BLK_FEAT_PCI_P2PDMA (nvme-pci sets it); false models a queue without
  /// it, where O_DIRECT into P2P memory is EREMOTEIO.
  bool p2pdma = true;
  PathPolicy path = PathPolicy::automatic;  // p2p or automatic (the DMA layer may bounce)
};

/// A change the process makes to its buffer while an HmmJob runs: at `at_us` of simulated
/// time it remaps [offset, offset + len) of the buffer (munmap, then mmap at the same
/// address) as anonymous memory or as P2P memory (mmap of the buffer device's p2pmem
/// allocate file) and writes fresh data into it, or migrates the anonymous pages there
/// (migrate_pages(), which copies them).
struct HmmEvent {
  enum class Op : uint8_t { anon, p2p, migrate };
  double at_us = 0;
  Op op = Op::anon;
  uint64_t offset = 0, len = 0;  // bytes of the buffer, 4 KiB aligned
  /// The change lands inside the device's first fault from at_us on, between its
  /// hmm_range_fault() and the mirror's commit (a munmap on another CPU), so that fault
  /// retries; with no fault after at_us it never lands (JobResult::hmm_events counts those
  /// that did).
  bool race = false;
};
const char* hmm_event_op_name(HmmEvent::Op op) noexcept;

/// A device working on a process's buffer through a mirror of its address space (HMM:
/// mem::HmmMirror, no pinning): a GPU or accelerator with shared virtual memory, or an RDMA
/// NIC with on-demand paging. The process maps `queue_depth` blocks of `block_size` bytes,
/// each block's first host_bytes anonymous memory and the rest P2P memory from
/// buffer_function's p2pmem allocate file (all anonymous without one), and fills them. For
/// each block of the job the device reads the block and writes new data into it, page by
/// page through the mirror: a page it has no entry for faults, the mirror resolves it
/// (hmm_range_fault) and maps it through the device's DmaDevice (hmm_dma_map_pfn); the
/// process's events change the buffer meanwhile and the notifier invalidates the device's
/// entries. Every byte the device reads is checked against what the process's page tables
/// map at that moment, every byte it writes read back through them.
struct HmmJob {
  uint32_t device = 0;
  std::optional<uint32_t> buffer_function;
  uint64_t host_bytes = 0;  // with a P2P buffer: a 4 KiB multiple below the block size (0: all P2P)
  uint32_t fault_pages = 16;     // the mirror's fault-around window (HmmMirrorOptions::fault_pages)
  double fault_latency_us = 20;  // what one device fault adds to its block's latency
  std::vector<HmmEvent> events;  // in any order; applied by time
  /// Tests only (no scenario key): the mirror's notifier is removed before the first event,
  /// so the process's changes never reach the device page table: the broken driver whose
  /// stale translations the byte checks must catch.
  bool test_drop_notifier = false;
};

/// What moves a job's data.
using JobKind = std::variant<NvmeJob, CopyJob, NetJob, DirectIoJob, HmmJob>;

/// A workload and its shape. The kind says what moves the data; the shape is the same for all.
struct Job {
  std::string name;
  JobKind kind;
  uint64_t block_size = 128 * KiB;  // an NVMe command's, a copy's or a packet's bytes
  unsigned queue_depth = 16;        // commands or copies in flight, or the TX ring's packets
  uint64_t size = 256 * MiB;        // total bytes

  /// The device that starts the job's DMA: the SSD, the copy engine's device, the sender
  /// (for an O_DIRECT copy: the SSD read from; for an HMM job: the device with the mirror).
  uint32_t device() const noexcept;
};

/// The job kind for `device` by its class: an NvmeJob for an NVMe controller, a CopyJob for
/// a GPU or accelerator (write and buffer as given; path automatic). EINVAL naming the
/// device and its class for anything else (a NIC's job needs a receiver: NetJob).
Result<JobKind> job_kind_for(const pci::Topology& topo, uint32_t device, bool write, std::optional<uint32_t> buffer_function);

/// The ways a job's data actually went, as flags in JobResult::via: one for an NVMe or
/// copy-engine job, one per side (TX, RX) for a network job, plus `bounced` when the DMA
/// layer bounced any of it. JobResult::path says the same in words.
enum class Via : uint8_t {
  host_memory = 1 << 0,      // buffers in host memory
  p2p_bus_addr = 1 << 1,     // P2P by PCI bus address, below the root complex (a switch, or inside the device)
  p2p_host_bridge = 1 << 2,  // P2P through the root complex
  bounced = 1 << 3,          // P2P memory the DMA layer bounced through host memory (swiotlb)
  staged = 1 << 4,           // staged through a host buffer and a copy engine (path = "bounce")
};
/// "host_memory", "p2p_bus_addr", "p2p_host_bridge", "bounced", "staged".
const char* via_name(Via v) noexcept;
/// Every Via, in the order above.
inline constexpr Via kAllVia[] = {Via::host_memory, Via::p2p_bus_addr, Via::p2p_host_bridge, Via::bounced, Via::staged};
/// A set of Via flags.
using ViaFlags = Flags<Via>;

struct JobResult {
  std::string name, device, buffer, path;  // path actually taken
  ViaFlags via;                             // the same as Via flags
  bool took(Via v) const noexcept { return via.has(v); }
  uint64_t bytes = 0, ios = 0, verified_bytes = 0;
  double seconds = 0, gbps = 0;            // simulated time and throughput (GB/s)
  double lat_p50_us = 0, lat_p99_us = 0, lat_p999_us = 0;  // from a log-linear histogram: within 0.4%
  /// The job's shape, as fio reports it: rw (read, write, randread, randwrite; copy for an
  /// O_DIRECT copy, send for a network job), bs and qd (the size is `bytes`).
  std::string rw;
  uint64_t block_size = 0;
  unsigned queue_depth = 0;
  uint64_t prp_ios = 0, sgl_ios = 0;       // how the commands described their DMA lists
  uint64_t rc_bytes = 0, host_memory_bytes = 0;
  std::vector<std::pair<std::string, uint64_t>> link_bytes;  // non-zero resources, by name
  uint64_t iommu_faults = 0;               // recorded during this job
  uint64_t bios = 0, requests = 0;         // O_DIRECT jobs: the block layer's, reads and writes
  /// HMM jobs: the mirror's device faults, invalidations and retried faults (HmmMirrorStats),
  /// and the process's events applied.
  uint64_t hmm_faults = 0, hmm_invalidations = 0, hmm_retries = 0, hmm_events = 0;
};

/// Runs one job on a fresh fabric clock: every I/O (command, copy, packet) is mapped through
/// the DMA layer, its bytes moved by the device model and checked (an SSD's against its
/// namespace, a sparse file filled with a pattern per block; a copy job's against the
/// device's memory; a packet against what was sent), and timed over the fabric (and the
/// wire). Errors (EINVAL naming the job): the device is not of the job's kind (an NvmeJob
/// on a GPU, a NetJob on an SSD), a shape or buffer placement the kind cannot take; EREMOTEIO
/// when a policy of p2p meets a pair the fabric or the DMA layer refuses.
Result<JobResult> run_job(Machine& machine, const Job& job);

/// The most jobs run_jobs() runs at once.
inline constexpr size_t kMaxGroupJobs = 256;

/// Runs `jobs` at once on one fabric clock, as fio runs the jobs of one group: their
/// transfers share every link, switch, root complex and memory controller max-min fairly,
/// and jobs on the same SSD, copy engine or wire share its in-order service. Each job is
/// checked and set up as run_job() does (its buffers disjoint from the others', from the
/// pools and host memory), then all start at the same time; each result has the job's own
/// bytes, time (from the group's start to its last completion), latencies and per-resource
/// bytes, which over the group add up to the fabric's counters (reset at the start). A job
/// that fails (in setup or later) has its error; the others run on. run_job() is a group of
/// one. `progress(i, done, total)`, if given, as job i's items complete. More than
/// kMaxGroupJobs jobs: every entry is EINVAL.
std::vector<Result<JobResult>> run_jobs(Machine& machine, std::span<const Job> jobs,
                                        const std::function<void(size_t job, uint64_t done, uint64_t total)>& progress = {});

// -------------------------------------------------------------------------------------
// Scenarios: a machine and jobs, from TOML (docs/sim.md)

/// A job as a scenario names it; resolved against a machine by resolve_job().
struct JobSpec {
  std::string name;
  std::string device;   // the NVMe SSD, GPU or accelerator, or sending NIC (name or BDF)
  bool write = false;
  bool random = false;  // rw = randread or randwrite (NVMe jobs): NvmeJob::random
  uint64_t block_size = 128 * KiB;
  unsigned queue_depth = 32;
  uint64_t size = 256 * MiB;
  std::string buffer = "host";  // "host", a device (its largest BAR), or "nearest"
  PathPolicy path = PathPolicy::automatic;
  std::string peer;                  // network jobs: the receiving NIC (empty: an NVMe job)
  std::string peer_buffer = "host";  // network jobs: where the receiver's RX buffers are
  std::string copy_to;               // O_DIRECT jobs: the SSD the blocks are written to (empty: not one)
  uint64_t host_bytes = 0;           // O_DIRECT jobs: DirectIoJob::host_bytes
  bool p2pdma = true;                // O_DIRECT jobs: DirectIoJob::p2pdma
  NetJob::Rx rx = NetJob::Rx::plain;  // network jobs: "plain", "devmem" or "copy" (NetJob::rx)
  NetJob::Tx tx = NetJob::Tx::plain;  // network jobs: "plain" or "devmem" (NetJob::tx)
  uint32_t header_bytes = 128;        // network jobs with rx or tx = "devmem": the header split
  double wire_gbps = 0;               // network jobs: the wire's rate, GB/s (0: the machine's)
  bool hmm = false;                   // an HMM job (HmmJob): the device works through a mirror
  uint32_t fault_pages = 16;          // HMM jobs: HmmJob::fault_pages
  double fault_us = 20;               // HMM jobs: HmmJob::fault_latency_us
  std::vector<HmmEvent> events;       // HMM jobs: the process's changes ([[job.event]])
  /// fio's stonewall: the job waits for every earlier job to end and starts a new group
  /// (only changes anything in a concurrent scenario, where jobs otherwise run at once).
  bool stonewall = false;
  std::string where;    // "FILE:LINE" for messages
};

struct Scenario {
  std::string name, description, source;
  /// A built-in machine, a TOML machine file or a sysfs snapshot's root (pci::load_machine);
  /// a relative path is looked for in `folder` first (scenario_machine()).
  std::string machine{kDefaultMachine};
  std::string machine_where;  // "FILE:LINE" of the machine key, for messages (empty: no key)
  /// The folder of the scenario's file (load_scenario sets it; empty for a built-in scenario
  /// or text parsed by parse_scenario).
  std::filesystem::path folder;
  MachineOptions options;
  /// [options] concurrent: the jobs run at once, as fio runs a job file's jobs, until a job
  /// with stonewall starts the next group; false (the default, unlike fio): one job after
  /// another, each a group of its own.
  bool concurrent = false;
  std::vector<JobSpec> jobs;
};

/// Parses scenario TOML; errors name SOURCE:LINE, the key and the problem.
Result<Scenario> parse_scenario(std::string_view text, std::string_view source);
/// Resolves device and buffer names against the machine. ENODEV/EINVAL name the job.
Result<Job> resolve_job(const JobSpec& spec, Machine& machine);

/// A scenario by file or name: the TOML file at `file_or_name` if there is one (`folder`
/// set to its folder), else the built-in scenario of that name (physr/builtin.hpp, source
/// "builtin:NAME"). ENOENT naming it and the built-in scenarios otherwise; parse errors as
/// parse_scenario.
Result<Scenario> load_scenario(std::string_view file_or_name);
/// Where a scenario's machine is: `folder / machine` when the machine is a relative path
/// and something is there, else `machine` as it is (a path from the current directory, or
/// a built-in name).
std::string scenario_machine(const Scenario& sc);

/// One job of a scenario run: its result, or the error that stopped it (from resolve_job
/// or run_job), as fio reports each job of a job file.
struct JobOutcome {
  std::string name;          // JobSpec::name
  Result<JobResult> result;
  size_t group = 0;          // the group it ran in (GroupReport::index)
};

/// A group of jobs that ran at once, as fio's group reporting sums them: the bytes of its
/// jobs that succeeded over the time from the group's start to its last job's end.
struct GroupReport {
  size_t index = 0;          // from 0, in the scenario's order
  std::vector<size_t> jobs;  // indices into ScenarioReport::jobs
  uint64_t bytes = 0;
  double seconds = 0, gbps = 0;  // gbps: aggregate GB/s (bytes over seconds)
  size_t failed = 0;
};

/// What running a scenario gave.
struct ScenarioReport {
  std::string machine;                // scenario_machine(): the machine the jobs ran on
  std::vector<std::string> warnings;  // the machine loader's and the model's, each naming the machine
  std::vector<JobOutcome> jobs;       // one per job, in the scenario's order
  std::vector<GroupReport> groups;    // one per group, in order (one per job unless concurrent)
  bool concurrent = false;            // Scenario::concurrent
  /// The jobs that failed.
  size_t failed() const noexcept;
};

/// Runs a scenario: loads its machine (scenario_machine(), pci::load_machine), builds one
/// Machine with the scenario's options, resolves every job, and runs its groups one after
/// another (run_jobs(): the jobs of a group at once; a group per job unless the scenario is
/// concurrent); `progress(i, spec)` is called before job i's group starts, for each of its
/// jobs. A job that fails records its error in its entry and the others run;
/// `inside(i, done, total)`, if given, as job i's I/Os complete. Errors (no job ran): the
/// machine cannot be loaded or built, naming the scenario and the machine.
Result<ScenarioReport> run_scenario(const Scenario& sc,
                                    const std::function<void(size_t job, const JobSpec& spec)>& progress = {},
                                    const std::function<void(size_t job, uint64_t done, uint64_t total)>& inside = {});

}  // namespace physr::sim
