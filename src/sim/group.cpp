// Jobs that run at once: one Simulator for a group of jobs, and the loop that steps every
// job's Driver on it (Group in job_common.hpp). A job alone is a group of one.
//
// Each runner keeps its state in its own frame (buffers, mappings, its Stages), so the
// group calls the runners one inside the other: runner k sets its job up and calls
// run(), which calls runner k + 1, and the last one's run() runs the loop. When the loop
// ends every run() returns, innermost first, and each runner fills its result from its
// own counters and gives its buffers back.
#include <cmath>
#include <limits>

#include "sim/job_common.hpp"

namespace physr::sim::detail {

void Group::start(const std::function<void(size_t)>& job) {
  job_ = &job;
  chain(0);
  job_ = nullptr;
}

void Group::chain(size_t k) {
  if (k == drivers_.size()) {
    loop();
    return;
  }
  current_ = k;
  (*job_)(k);
  // A runner that failed before run() never went on to the next job: go on for it. (Its
  // own flag: the jobs after it ran inside this call if it did.)
  if (!ran_[k]) chain(k + 1);
}

Status Group::run(Driver& d) {
  const size_t k = current_;
  PHYSR_ASSERT(k < drivers_.size() && !ran_[k], "each job of a group runs its driver once, from its runner");
  ran_[k] = 1;
  drivers_[k] = &d;
  if (d.set_owner) d.set_owner(static_cast<uint32_t>(k));
  chain(k + 1);
  return d.status;
}

void Group::loop() {
  constexpr double kNever = std::numeric_limits<double>::infinity();
  PHYSR_ASSERT(!looped_, "a group's loop runs once, inside its last job's call");
  looped_ = true;
  for (Driver* d : drivers_)
    if (d) d->start_ns = d->end_ns = d->ready_at = sim_.now();
  by_owner_.assign(drivers_.size(), {});
  std::vector<size_t> finished;
  while (true) {
    // Every job submits what it may now: up to its queue depth, one item per gap while its
    // queue ramps up (the driver ramps a queue up one command per block's media time, so
    // commands do not move in lockstep).
    bool live = false;
    double horizon = kNever;
    for (size_t k = 0; k < drivers_.size(); ++k) {
      Driver* d = drivers_[k];
      if (!d || d->done()) continue;
      while (d->in_flight < d->queue_depth && d->next < d->items && sim_.now() >= d->ready_at) {
        const size_t faults = m_.faults().size();
        d->status = d->submit(d->next++);
        d->faults += m_.faults().size() - faults;  // an I/O's faults are recorded as it moves its bytes
        if (!d->status) break;
        ++d->in_flight;
        if (d->next <= d->ramp) {
          d->ready_at = sim_.now() + d->ramp_gap_ns;
          if (d->ready_at > sim_.now()) break;
        }
      }
      if (!d->status) {
        d->end_ns = sim_.now();
        continue;
      }
      live = true;
      if (d->ready_at > sim_.now()) horizon = std::min(horizon, d->ready_at);
    }
    if (!live) return;
    if (std::isfinite(horizon)) sim_.idle_until(horizon, finished);
    else sim_.step(finished);
    if (finished.empty() && !std::isfinite(horizon)) {  // cannot happen: every flow ends
      for (Driver* d : drivers_)
        if (d && !d->done()) d->status = make_error(EIO, d->where + ": the simulation stalled"), d->end_ns = sim_.now();
      return;
    }
    if (finished.empty()) continue;
    // Each job's finished flows to its own stages (by the owner they were added with).
    const auto deliver = [&](Driver& d, const std::vector<size_t>& flows, size_t k) {
      if (!d.status) {  // a job that failed: its I/Os in flight end, nobody waits for them
        for (size_t f : flows) sim_.release(f);
        return;
      }
      double last = d.end_ns;
      for (size_t f : flows) last = std::max(last, sim_.finish_ns(f));
      const uint64_t ended = d.advance(flows);
      d.completed += ended;
      d.in_flight -= ended;
      if (d.completed >= d.items) d.end_ns = last;
      if (d.completed >= d.next_report) {  // about every 1/256 of the job
        if (progress_) progress_(k, d.completed, d.items);
        d.next_report = d.completed + (d.items / 256 > 0 ? d.items / 256 : 1);
      }
    };
    if (drivers_.size() == 1) {
      deliver(*drivers_[0], finished, 0);
      continue;
    }
    for (size_t f : finished) by_owner_[sim_.owner(f)].push_back(f);
    for (size_t k = 0; k < drivers_.size(); ++k) {
      if (by_owner_[k].empty()) continue;
      deliver(*drivers_[k], by_owner_[k], k);
      by_owner_[k].clear();
    }
  }
}

}  // namespace physr::sim::detail
