// The pool behind parallel_claims (thread_pool.h): workers that spin between jobs, prefetching the next
// weight, and sleep after a while idle.

#include "thread_pool.h"

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>

#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <unordered_map>

namespace pagedformers {
namespace {

using Clock = std::chrono::steady_clock;

// The ticket packs the job's number (bits 16 up), a closed bit and the count of workers that joined it.
constexpr uint64_t kJobShift = 16, kClosed = uint64_t{1} << 15, kJoined = kClosed - 1;
// How much of the next weight a worker asks for. In-process A/B on the 200M Llama at batch 1 (decode steps
// interleaved, 12-20 rounds): 4 MiB took 4-6% off the step, 2 MiB and 8 MiB less. Issued as fast as the core
// takes prefetch instructions, not paced to the memory: pacing (12-30 GB/s) and plain loads gained nothing.
constexpr int64_t kPrefetchAhead = int64_t{4} << 20;
constexpr int64_t kPrefetchRun = 64 * 64;                    // bytes asked for between two looks at the ticket
constexpr auto kYieldEvery = std::chrono::microseconds(20);  // idle: let a thread waiting for this core in
constexpr auto kSleepAfter = std::chrono::milliseconds(2);   // then sleep (a decode step's Python: ~1 ms)

struct Pool {
  std::atomic<uint64_t> ticket{0};
  // The job, written by its caller before the ticket names it; read by a worker only once it has joined.
  ItemRange range = nullptr;
  const void* context = nullptr;
  int64_t items = 0, grain = 1;
  Stream prefetch;
  std::atomic<int64_t> next{0};
  std::atomic<uint64_t> finished{0};
  // The callers' side, under `busy`: the workers started, the order buffers were streamed in.
  std::atomic<bool> busy{false};
  int workers = 0;
  int cpus = 0;  // the creating thread may run on these many: more workers than cpus - 1 would share a core
  std::unordered_map<const void*, Stream> successor;
  const void* last_streamed = nullptr;
  // Workers asleep, woken by the next job.
  std::atomic<int> sleepers{0};
  std::mutex mutex;
  std::condition_variable wake;
};

// Never destroyed: workers are detached and may still spin at exit. A forked child, which has none of the
// parent's threads, starts a pool of its own.
std::atomic<Pool*> the_pool{nullptr};

void forget_pool_in_child() { the_pool.store(nullptr); }

Pool& pool() {
  static const bool registered = (pthread_atfork(nullptr, nullptr, forget_pool_in_child), true);
  (void)registered;
  Pool* p = the_pool.load(std::memory_order_acquire);
  if (p != nullptr) return *p;
  auto* fresh = new Pool;
  cpu_set_t cpus;
  fresh->cpus = sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus) : 1 << 16;
  if (the_pool.compare_exchange_strong(p, fresh)) return *fresh;
  delete fresh;  // another thread installed one first
  return *p;
}

uint64_t job_of(uint64_t ticket) { return ticket >> kJobShift; }

void prefetch_a_run(Stream& ahead) {
  const int64_t n = std::min(ahead.bytes, kPrefetchRun);
  for (int64_t i = 0; i < n; i += 64) _mm_prefetch(ahead.data + i, _MM_HINT_T0);  // never faults, even freed
  ahead.data += n;
  ahead.bytes -= n;
}

void sleep_until_next_job(Pool& p, uint64_t seen) {
  std::unique_lock<std::mutex> lock(p.mutex);
  p.sleepers.fetch_add(1);  // sequentially consistent, as are the caller's ticket store and sleepers load
  p.wake.wait(lock, [&] { return job_of(p.ticket.load()) != seen; });
  p.sleepers.fetch_sub(1);
}

// Joins job `seen` unless it is closed, and runs items until none are left. Returns what to prefetch next.
Stream join(Pool& p, uint64_t seen, uint64_t ticket, Stream ahead) {
  while (job_of(ticket) == seen && !(ticket & kClosed)) {
    if (p.ticket.compare_exchange_weak(ticket, ticket + 1, std::memory_order_acq_rel)) {
      for (int64_t item; (item = p.next.fetch_add(p.grain, std::memory_order_relaxed)) < p.items;)
        p.range(p.context, item, std::min(p.items, item + p.grain));
      if (p.prefetch.bytes > 0) ahead = p.prefetch;
      p.finished.fetch_add(1, std::memory_order_release);  // from here on the caller may write the next job
      break;
    }
  }
  return ahead;
}

void work(Pool& p) {
  uint64_t seen = job_of(p.ticket.load());
  Stream ahead;
  Clock::time_point idle_since = Clock::now(), yielded = idle_since;
  for (;;) {
    const uint64_t ticket = p.ticket.load(std::memory_order_acquire);
    if (job_of(ticket) != seen) {
      seen = job_of(ticket);
      ahead = join(p, seen, ticket, ahead);
      idle_since = yielded = Clock::now();
    } else if (ahead.bytes > 0) {
      prefetch_a_run(ahead);
    } else {
      for (int i = 0; i < 64 && p.ticket.load(std::memory_order_relaxed) == ticket; ++i) _mm_pause();
      const Clock::time_point now = Clock::now();
      if (now - idle_since > kSleepAfter) {
        sleep_until_next_job(p, seen);
        idle_since = yielded = Clock::now();
      } else if (now - yielded > kYieldEvery) {
        sched_yield();
        yielded = now;
      }
    }
  }
}

// Notes `streams` as following the buffer streamed before it, and returns the start of the one that followed
// `streams` last time: what the workers prefetch once this job is done.
Stream next_to_prefetch(Pool& p, Stream streams) {
  if (streams.data == nullptr) return {};
  if (p.successor.size() > 4096) p.successor.clear();  // models loaded and dropped: keep the map small
  if (p.last_streamed != nullptr) p.successor[p.last_streamed] = streams;
  p.last_streamed = streams.data;
  const auto found = p.successor.find(streams.data);
  if (found == p.successor.end()) return {};
  return Stream{found->second.data, std::min(found->second.bytes, kPrefetchAhead)};
}

}  // namespace

bool pool_run(int64_t items, int64_t grain, ItemRange range, const void* context, Stream streams) {
  if (at::in_parallel_region()) return false;
  Pool& p = pool();
  const int threads = std::min(at::get_num_threads(), p.cpus);
  if (threads < 2 || p.busy.exchange(true, std::memory_order_acquire)) return false;
  try {
    for (; p.workers < threads - 1; ++p.workers) std::thread(work, std::ref(p)).detach();
  } catch (const std::system_error&) {  // no more threads allowed: make do with those there are
    p.cpus = p.workers + 1;
    if (p.workers == 0) {
      p.busy.store(false, std::memory_order_release);
      return false;
    }
  }
  p.range = range, p.context = context, p.items = items, p.grain = grain;
  p.prefetch = next_to_prefetch(p, streams);
  p.next.store(0, std::memory_order_relaxed);
  p.finished.store(0, std::memory_order_relaxed);
  const uint64_t job = job_of(p.ticket.load(std::memory_order_relaxed)) + 1;
  p.ticket.store(job << kJobShift);  // sequentially consistent: see sleep_until_next_job
  if (p.sleepers.load() > 0) {
    std::lock_guard<std::mutex> lock(p.mutex);
    p.wake.notify_all();
  }
  std::exception_ptr failed;  // an item that threw on this thread: the workers still finish theirs first
  try {
    for (int64_t item; (item = p.next.fetch_add(grain, std::memory_order_relaxed)) < items;)
      range(context, item, std::min(items, item + grain));
  } catch (...) {
    failed = std::current_exception();
    p.next.store(items, std::memory_order_relaxed);  // no more claims
  }
  const uint64_t joined = p.ticket.exchange(job << kJobShift | kClosed, std::memory_order_acq_rel) & kJoined;
  while (p.finished.load(std::memory_order_acquire) < joined) _mm_pause();
  p.busy.store(false, std::memory_order_release);
  if (failed) std::rethrow_exception(failed);
  return true;
}

}  // namespace pagedformers
