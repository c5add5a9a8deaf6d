// physr pci: the PCI topology of a machine and the P2P verdicts Linux computes for it.
//
// A Topology is loaded from a live or snapshotted sysfs (the layout hwloc-gather-topology
// writes), or from a declarative TOML machine file (docs/machine-format.md), a file or one
// built into the library (physr/builtin.hpp). The P2PEngine
// answers, for a provider and a client function, what drivers/pci/p2pdma.c
// calc_map_type_and_dist() answers: bus_addr, thru_host_bridge or not_supported, with the
// distance, and explains the answer hop by hop.
//
// Design rationale
// - Functions live in one vector; relations are indices (upstream bridge, host bridge), so
//   a Topology is a plain value that copies and compares.
// - The engine precomputes, per function, its depth, its Euler-tour interval (O(1) "is an
//   ancestor of") and the count of ACS-redirecting devices on its chain to the root. A
//   verdict is then a walk up the provider's chain to the first ancestor of the client
//   (a few steps) and two subtractions, instead of the kernel's O(depth^2) double walk;
//   both give the same answer by construction, and the tests check it against a direct
//   transcription of the kernel loop.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "physr/core.hpp"

namespace physr::pci {

/// A PCI function address: domain (may exceed 16 bits, as with VMD), bus, device, function.
struct Bdf {
  uint32_t domain = 0;
  uint8_t bus = 0;
  uint8_t dev = 0;
  uint8_t fn = 0;

  uint8_t devfn() const noexcept { return static_cast<uint8_t>(dev << 3 | fn); }
  /// "0000:03:00.0" (the domain keeps all its hex digits when above 0xffff).
  std::string to_string() const;
  friend auto operator<=>(const Bdf&, const Bdf&) = default;
};
/// Parses "DDDD:BB:DD.F" or "BB:DD.F" (domain 0). EINVAL naming the text otherwise.
Result<Bdf> parse_bdf(std::string_view text);

/// PCIe port type (PCIe capability, Device/Port Type field), or what we know without it.
enum class PortType : uint8_t {
  unknown,            // no PCIe capability visible (short config read) and not inferred
  conventional,       // a conventional PCI function (config space read, no PCIe capability)
  endpoint,           // 0: PCI Express Endpoint
  legacy_endpoint,    // 1: Legacy PCI Express Endpoint
  root_port,          // 4: Root Port of a Root Complex
  switch_upstream,    // 5: Upstream Port of a switch
  switch_downstream,  // 6: Downstream Port of a switch
  pcie_to_pci,        // 7: PCI Express to PCI/PCI-X bridge
  pci_to_pcie,        // 8: PCI/PCI-X to PCI Express bridge
  rc_endpoint,        // 9: Root Complex Integrated Endpoint
  rc_event_collector, // 10: Root Complex Event Collector
};
/// "root_port", "switch_upstream", ... (the names machine files use).
const char* port_type_name(PortType t) noexcept;
/// Inverse of port_type_name; EINVAL naming the text and the accepted names otherwise.
Result<PortType> parse_port_type(std::string_view name);

/// ACS Control bits (PCIe spec 7.7.8; Linux include/uapi/linux/pci_regs.h PCI_ACS_*).
namespace acs {
inline constexpr uint16_t SV = 0x0001, TB = 0x0002, RR = 0x0004, CR = 0x0008, UF = 0x0010, EC = 0x0020, DT = 0x0040;
/// The bits that redirect peer requests upstream (Linux p2pdma.c pci_bridge_has_acs_redir()).
inline constexpr uint16_t kRedirect = RR | CR | EC;
}  // namespace acs

/// What is known about a function's ACS capability.
struct AcsState {
  enum class Kind : uint8_t { unknown, absent, present } kind = Kind::unknown;
  uint16_t cap = 0;   // ACS Capability register
  uint16_t ctrl = 0;  // ACS Control register
  bool redirects() const noexcept { return kind == Kind::present && (ctrl & acs::kRedirect) != 0; }
};
/// "RR CR EC"-style list of the set control bits ("-" when none).
std::string acs_bits_string(uint16_t ctrl);

/// IORESOURCE_* bits of a BAR (include/linux/ioport.h) that physr reads; a set of them is
/// IoResourceFlags, which keeps every other bit sysfs lists too (from_bits()).
enum class IoResource : uint64_t {
  io = 0x100,          // IORESOURCE_IO
  mem = 0x200,         // IORESOURCE_MEM
  prefetch = 0x2000,   // IORESOURCE_PREFETCH
  mem_64 = 0x100000,   // IORESOURCE_MEM_64
};
using IoResourceFlags = Flags<IoResource>;

/// One BAR as sysfs `resource` lists it: CPU physical [start, end] and IORESOURCE flags.
struct Bar {
  unsigned index = 0;
  PhysSpan span;          // the CPU addresses it decodes, half-open (sysfs lists the inclusive end)
  IoResourceFlags flags;  // IORESOURCE_* bits, as sysfs lists them
  uint64_t size() const noexcept { return span.size; }
  bool is_mem() const noexcept { return flags.has(IoResource::mem); }
  bool prefetchable() const noexcept { return flags.has(IoResource::prefetch); }
};

/// An NVMe controller memory buffer (CMB): which BAR holds it and what its CMBSZ register
/// allows (RDS: data of read commands may be in the CMB; WDS: data of write commands).
/// Linux publishes a CMB as P2P memory only when both are set (nvme_map_cmb()).
struct NvmeCmb {
  unsigned bar = 0;
  bool rds = true, wds = true;
};

/// One PCI function.
struct Function {
  Bdf bdf;
  uint16_t vendor = 0;
  uint16_t device = 0;
  uint32_t class_code = 0;  // 24 bits: base class, subclass, programming interface
  uint8_t header_type = 0;  // without the multi-function bit
  PortType port_type = PortType::unknown;
  bool port_type_inferred = false;  // root port guessed from a bridge on a root bus
  AcsState acs;
  std::vector<Bar> bars;
  int numa_node = -1;
  double link_speed_gts = 0;  // 0 when unknown
  unsigned link_width = 0;    // 0 when unknown
  std::string name;           // a label from a machine file, or empty
  std::optional<NvmeCmb> cmb;  // an NVMe controller's CMB, when a machine file declares one
  int32_t upstream = -1;      // index of the upstream bridge; -1 on a root bus
  uint32_t host_bridge = 0;   // index into Topology::host_bridges

  uint8_t base_class() const noexcept { return static_cast<uint8_t>(class_code >> 16); }
  /// Base class and subclass together (class_code >> 8), as Linux compares pdev->class >> 8
  /// with its 16-bit PCI_CLASS_* values: 0x0108 for an NVM controller.
  uint16_t subclass() const noexcept { return static_cast<uint16_t>(class_code >> 8); }
};

/// PCI class codes (PCI Code and ID Assignment specification; Linux include/linux/pci_ids.h),
/// the one place physr names them: base classes (8 bits, Function::base_class()), base class
/// and subclass (16 bits, Function::subclass()), and full codes (24 bits with the programming
/// interface, Function::class_code, the `class` of a machine file).
inline constexpr uint8_t kBaseClassStorage = 0x01;
inline constexpr uint8_t kBaseClassNetwork = 0x02;
inline constexpr uint8_t kBaseClassDisplay = 0x03;      // VGA, 3D and other display controllers: GPUs
inline constexpr uint8_t kBaseClassBridge = 0x06;
inline constexpr uint8_t kBaseClassProcessor = 0x0b;    // processors, co-processors (0x0b40)
inline constexpr uint8_t kBaseClassAccelerator = 0x12;  // processing accelerators
inline constexpr uint16_t kSubclassNvm = 0x0108;        // non-volatile memory controller (NVMHCI or NVMe)
inline constexpr uint16_t kSubclassPciBridge = 0x0604;
inline constexpr uint16_t kSubclassPciBridgeSemiTransparent = 0x0609;
inline constexpr uint32_t kClassNvme = 0x010802;        // NVM controller, NVM Express interface
inline constexpr uint32_t kClassHostBridge = 0x060000;
inline constexpr uint32_t kClassPciBridge = 0x060400;   // PCI-to-PCI bridge, normal decode

/// An NVMe controller (class 0x0108xx): the model's SSDs; only these have a CMB.
inline bool is_nvme(const Function& f) noexcept { return f.subclass() == kSubclassNvm; }
/// Any mass storage controller (base class 0x01).
inline bool is_storage(const Function& f) noexcept { return f.base_class() == kBaseClassStorage; }
/// A network controller (base class 0x02): the model's NICs.
inline bool is_network(const Function& f) noexcept { return f.base_class() == kBaseClassNetwork; }
/// A display controller (base class 0x03): GPUs.
inline bool is_display(const Function& f) noexcept { return f.base_class() == kBaseClassDisplay; }
/// A processing accelerator (base class 0x12).
inline bool is_accelerator(const Function& f) noexcept { return f.base_class() == kBaseClassAccelerator; }
/// A processor or co-processor (base class 0x0b).
inline bool is_processor(const Function& f) noexcept { return f.base_class() == kBaseClassProcessor; }
/// A GPU or processing accelerator: the devices the machine model gives a copy engine.
inline bool is_display_or_accel(const Function& f) noexcept { return is_display(f) || is_accelerator(f); }
/// Any bridge (base class 0x06: host, ISA, PCI bridges): the functions `physr topo`
/// leaves out of the verdict matrix.
inline bool is_bridge(const Function& f) noexcept { return f.base_class() == kBaseClassBridge; }
/// A PCI-to-PCI bridge (class 0x0604 or 0x0609): it has a secondary bus below it.
inline bool is_pci_bridge(const Function& f) noexcept {
  return f.subclass() == kSubclassPciBridge || f.subclass() == kSubclassPciBridgeSemiTransparent;
}

/// Human name of a class code ("NVMe controller", "3D controller", ...).
std::string class_name(uint32_t class_code);

/// A host bridge: one PCI domain and root bus number.
struct HostBridge {
  uint32_t domain = 0;
  uint8_t bus = 0;
  int numa_node = -1;
  std::vector<uint32_t> root_functions;  // indices, by ascending devfn
  /// PCI bus address = CPU physical address + bus_offset (mod 2^64) for memory BARs behind
  /// this host bridge: its window's translation offset, as many arm64 and POWER hosts
  /// have (Linux pci_bus_address() - pci_resource_start()). 0 on most x86 hosts.
  uint64_t bus_offset = 0;
  /// "pci0000:00".
  std::string name() const;
};

/// "No function": an index that names no function of any topology.
inline constexpr uint32_t kNoFunction = ~uint32_t{0};

/// CPU identity from /proc/cpuinfo (or a machine file), for the AMD Zen rule.
struct CpuInfo {
  std::string vendor;  // "GenuineIntel", "AuthenticAMD", ... or empty when unknown
  uint32_t family = 0;
  bool known() const noexcept { return !vendor.empty(); }
};

/// Whether Linux allows P2P through any host bridge on this CPU (p2pdma.c
/// cpu_supports_p2pdma(): an AMD CPU of family 0x17, Zen, or newer).
bool cpu_supports_p2pdma(const CpuInfo& cpu) noexcept;

/// A machine's PCI topology.
struct Topology {
  std::string source;  // where it came from, for messages
  std::string name;
  CpuInfo cpu;
  std::vector<HostBridge> host_bridges;
  std::vector<Function> functions;
  /// Oddities the loader accepted (e.g. one address under several bridges in an edited
  /// snapshot): the CLI prints them; verdicts follow the tree regardless.
  std::vector<std::string> warnings;

  /// Index of the function with this address (the first one, should it repeat).
  std::optional<uint32_t> find(const Bdf& bdf) const;
  /// Index of a function named by BDF text or by its machine-file name; ENODEV naming the
  /// text when there is none, EINVAL when the text is neither.
  Result<uint32_t> lookup(std::string_view bdf_or_name) const;
  /// Checks the relations (indices in range, no cycles); with unique_bdfs also that no
  /// address repeats (EEXIST).
  Status validate(bool unique_bdfs = false) const;
  /// Addresses that appear more than once.
  std::vector<Bdf> duplicate_bdfs() const;
};

/// What the configuration space says about a function.
struct ConfigInfo {
  uint16_t vendor = 0, device = 0;
  uint32_t class_code = 0;
  uint8_t header_type = 0;
  bool multifunction = false;
  bool has_pcie = false;
  PortType port_type = PortType::unknown;
  AcsState acs;
};
/// Parses configuration space bytes defensively: walks the capability list (at most 48
/// entries, as Linux's PCI_FIND_CAP_TTL) and the extended capability list (at most 480)
/// to the PCIe and ACS capabilities. A chain that loops, points outside the bytes read or
/// into the header ends the walk. Fewer than 64 bytes is EINVAL. With only the 64-byte
/// header (read without root), port type and ACS stay unknown.
Result<ConfigInfo> parse_config(std::span<const uint8_t> bytes);

/// Loads the PCI tree under ROOT/sys/devices/pci* and ROOT/proc/cpuinfo. ROOT is "/" for
/// the live machine or a snapshot's root. Errors name the file and the problem.
Result<Topology> load_sysfs(const std::filesystem::path& root);
/// Loads a TOML machine file (docs/machine-format.md).
Result<Topology> load_machine_file(const std::filesystem::path& file);
/// Parses TOML machine text; `source` names it in errors ("FILE:LINE: key: problem").
Result<Topology> parse_machine(std::string_view text, std::string_view source);
/// The built-in machine `name` (machines/NAME.toml, physr/builtin.hpp), its source
/// "builtin:NAME"; ENOENT naming it and the built-in machines when there is none.
Result<Topology> load_builtin_machine(std::string_view name);
/// The machine `spec` names, as `--machine` and a scenario's `machine` take it: the root of
/// a sysfs snapshot when it is a folder ("/" for this host), a TOML machine file when it is
/// a file, else a built-in machine. ENOENT naming it and the built-in machines otherwise;
/// the loaders' errors as they are.
Result<Topology> load_machine(std::string_view spec);

// -------------------------------------------------------------------------------------
// P2P verdicts

/// How a client reaches a provider's memory (Linux enum pci_p2pdma_map_type).
enum class MapType : uint8_t { not_supported, bus_addr, thru_host_bridge };
const char* map_type_name(MapType t) noexcept;

struct Verdict {
  MapType type = MapType::not_supported;
  int distance = 0;
};

/// A Linux release, major.minor. physr keys the version-dependent P2P rules (the allowlist
/// entries, how the allowlist identifies a host bridge) on the mainline release that brought
/// them; a stable kernel may carry some earlier (the Intel accelerator entries of 7.2 were
/// sent to stable).
struct KernelVersion {
  unsigned major = 0, minor = 0;
  /// "6.12".
  std::string to_string() const;
  friend auto operator<=>(const KernelVersion&, const KernelVersion&) = default;
};
/// The newest rules physr matches (the PCI tree's p2pdma branch after 7.3-rc1: 7.4) and
/// the oldest release whose rules it models (5.9, where cpu_supports_p2pdma() came in).
inline constexpr KernelVersion kNewestKernel{7, 4};
inline constexpr KernelVersion kOldestKernel{5, 9};
/// Parses "6.12", "6.12.117", "6.18.44-fc-v857" or "7.3-rc1" (what `uname -r` prints);
/// EINVAL naming the text otherwise.
Result<KernelVersion> parse_kernel_version(std::string_view text);
/// The releases after kOldestKernel at which a P2P verdict can change, oldest first.
std::span<const KernelVersion> kernel_rule_changes() noexcept;

/// What-if settings on top of the loaded topology.
struct VerdictOptions {
  /// Functions whose ACS redirect bits count as cleared (kernel pci=disable_acs_redir=).
  std::vector<Bdf> acs_redir_off;
  /// Override the CPU for the AMD Zen rule: nullopt uses the topology's CPU.
  std::optional<bool> assume_amd_zen;
  /// The kernel whose rules apply: its allowlist and host bridge identification. Releases
  /// newer than kNewestKernel get the newest rules; older than kOldestKernel is EINVAL.
  KernelVersion kernel = kNewestKernel;
};

/// One hop of an explanation.
struct PathHop {
  uint32_t function;
  bool redirects = false;   // counts as ACS redirect (after what-if options)
  bool acs_unknown = false;
};

/// Everything behind one verdict, for `physr explain`.
struct Explanation {
  Verdict verdict;
  std::optional<uint32_t> common;     // the common upstream device, if any
  std::vector<PathHop> provider_path; // provider up to and including the common device (or to its root)
  std::vector<PathHop> client_path;   // client up to, not including, the common device
  std::vector<uint32_t> acs_redirecting;  // in the order Linux prints them
  bool acs_unknown_on_path = false;
  bool cpu_amd_zen = false;
  bool same_host_bridge = false;
  struct BridgeCheck {
    uint32_t host_bridge;
    std::optional<uint32_t> identifying;  // the function the allowlist looks at
    bool listed = false;                  // vendor:device in the allowlist
    bool requires_same_host_bridge = false;
    bool passes = false;
  };
  /// The checks Linux host_bridge_whitelist() makes: one (same host bridge) or two; its `&&`
  /// skips the second host bridge when the first fails. Empty if not consulted.
  std::vector<BridgeCheck> allowlist;
  bool second_host_bridge_skipped = false;  // two host bridges, the first failed
  /// What Linux logs for this pair when it first maps it (pci_p2pdma_map_type(), verbose),
  /// one line each, "DEVICE: message" (the kernel prefixes the driver name: "nvme 0000:...").
  std::vector<std::string> kernel_log;
  KernelVersion kernel;                             // the rules applied
  std::optional<KernelVersion> newer_kernel_allows;  // not_supported here, allowed from this release
  std::string link_class;              // nvidia-smi style: X, PIX, PXB, PHB, NODE, SYS
  std::string kernel_parameter;        // "pci=disable_acs_redir=..." when ACS redirect decides
};

/// The nvidia-smi link classes and their definitions, for legends.
std::span<const std::pair<const char*, const char*>> link_class_legend();

/// Computes and caches verdicts for one topology. Thread-safe: verdict() may run on any
/// number of threads at once (the cache is lock-free); the engine is not modified after
/// create() otherwise.
class P2PEngine {
 public:
  /// `topo` must outlive the engine. ENODEV when an option names a function not in it;
  /// EINVAL for a tree more than 2047 levels deep (no PCI domain has one: 256 bus numbers).
  static Result<P2PEngine> create(const Topology& topo, VerdictOptions options = {});

  /// Verdict for (provider, client) function indices, computed once and cached per pair,
  /// as Linux caches the map type per client in the provider's p2pdma->map_types. A cached
  /// verdict is two dependent loads.
  Verdict verdict(uint32_t provider, uint32_t client) const {
    if (const std::atomic<uint16_t>* row = cache_.rows[provider].load(std::memory_order_acquire)) [[likely]] {
      const uint16_t v = row[client].load(std::memory_order_relaxed);
      if (v & kComputed) return Verdict{static_cast<MapType>((v >> 12) & 3), v & 0xfff};
    }
    return verdict_slow(provider, client);
  }
  /// The same, computed without touching the cache (for benchmarks and cross-checks, and
  /// for callers that visit every pair once, such as `physr topo`).
  Verdict compute(uint32_t provider, uint32_t client) const;
  /// The most the verdict cache holds: rows of 2 B per function, one per provider on its
  /// first lookup (65,535 functions: 512 rows); past it, verdict() computes uncached.
  static constexpr size_t kMaxCacheBytes = size_t{64} << 20;
  /// Bytes the verdict cache holds now (at most kMaxCacheBytes).
  size_t cache_bytes() const noexcept { return cache_.bytes.load(std::memory_order_relaxed); }
  /// Full explanation of one verdict.
  Explanation explain(uint32_t provider, uint32_t client) const;
  /// Linux pci_p2pdma_distance_many(): -1 if there are no clients or any is not supported,
  /// else the sum of distances.
  int distance_many(uint32_t provider, std::span<const uint32_t> clients) const;
  /// Linux pci_p2pmem_find_many(): among `published` providers (in the kernel's
  /// for_each_pci_dev() order), one at the smallest distance_many; like the kernel's one-page
  /// closest_pdevs array, only the first 512 tied providers (4096 / sizeof(void *)) are
  /// candidates; ties broken by pick(n) returning an index below n (random in Linux).
  std::optional<uint32_t> find_many(std::span<const uint32_t> clients, std::span<const uint32_t> published,
                                    const std::function<size_t(size_t)>& pick) const;
  /// Whether the allowlist check passes for the path between a and b (no common device).
  bool host_bridge_allowed(uint32_t a, uint32_t b) const;
  bool cpu_amd_zen() const noexcept { return amd_zen_; }
  /// The kernel whose rules the engine applies (VerdictOptions::kernel).
  KernelVersion kernel() const noexcept { return kernel_; }
  /// Whether function index `f` of the topology is the function at `bdf` (one load from a
  /// dense array: the DMA layer checks a provider's recorded index on every range).
  bool is_function(uint32_t f, const Bdf& bdf) const noexcept {
    return f < bdf_keys_.size() && bdf_keys_[f] == (uint64_t{bdf.domain} << 16 | uint64_t{bdf.bus} << 8 | bdf.devfn());
  }
  /// Linux pci_host_bridge_dev(): the function the allowlist checks for a host bridge (the
  /// first on its root bus, if devfn 00.0 or a Root Port), or nullopt (the check fails).
  std::optional<uint32_t> identifying_device(uint32_t host_bridge) const;
  const Topology& topology() const noexcept { return *topo_; }

 private:
  // A verdict packed in 16 bits: computed flag, map type, distance (12 bits). create()
  // refuses trees deeper than kMaxDepth, so every distance, 2 x (depth + 1) at most, fits.
  static constexpr uint16_t kComputed = 0x8000;
  static constexpr int kMaxDepth = 2046;
  // Rows of the verdict cache, one per provider, allocated on the provider's first lookup
  // and published with a compare-and-swap (a losing thread frees its copy), so lookups
  // never lock; each entry is written once with the value every thread computes alike.
  struct Cache {
    std::unique_ptr<std::atomic<std::atomic<uint16_t>*>[]> rows;
    uint32_t n = 0;
    std::atomic<size_t> bytes{0};  // rows allocated, reserved before each allocation
    Cache() = default;
    Cache(Cache&& o) noexcept : rows(std::move(o.rows)), n(o.n), bytes(o.bytes.exchange(0)) {}
    Cache& operator=(Cache&& o) noexcept;
    ~Cache() { release(); }
    void release() noexcept;
  };
  explicit P2PEngine(const Topology& topo) : topo_(&topo) {}
  Verdict verdict_slow(uint32_t provider, uint32_t client) const;
  bool redirects(uint32_t f) const noexcept { return redir_[f] != 0; }
  bool is_ancestor_or_self(uint32_t a, uint32_t b) const noexcept { return tin_[a] <= tin_[b] && tout_[b] <= tout_[a]; }
  std::optional<uint32_t> common_device(uint32_t provider, uint32_t client) const noexcept;
  std::optional<uint32_t> identifying_device(uint32_t host_bridge, KernelVersion k) const;
  bool bridge_passes(uint32_t host_bridge, bool same, KernelVersion k, Explanation::BridgeCheck* out) const;
  bool allowlist_passes(uint32_t ha, uint32_t hb, KernelVersion k) const;

  const Topology* topo_;
  bool amd_zen_ = false;
  KernelVersion kernel_ = kNewestKernel;
  std::vector<uint8_t> redir_;      // 1 if the function counts as ACS-redirecting
  std::vector<uint16_t> depth_;     // 0 on a root bus
  std::vector<uint32_t> acs_up_;    // redirecting devices from the function to its root, inclusive
  std::vector<uint32_t> tin_, tout_;
  std::vector<uint32_t> tree_;              // the root function of each function's tree
  std::vector<uint8_t> bridge_same_, bridge_other_;  // allowlist per host bridge, same / different
  mutable Cache cache_;
  std::vector<uint64_t> bdf_keys_;  // per function: domain, bus, devfn
};

}  // namespace physr::pci
