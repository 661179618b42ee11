// The kernels' own threads for small steps (a decode of a few sequences): parallel_claims runs a job's items
// on the calling thread and on spinning workers that join it, instead of in an OpenMP region.
//
// Why: a batch-1 decode step streams ~49 weights from memory with ~60 small ops between them, and the memory
// sits idle during those ops (~3 of a ~19 ms step on 2 Zen 3 cores). Between jobs a worker prefetches the
// start of the weight that followed this one the last time round (the same order every decode step), so that
// the next linear finds it in cache: 4-6% off the 200M Llama's batch-1 step. libgomp's worker cannot, as it
// only runs inside parallel regions. The pool without the prefetch is as fast as OpenMP, no faster.
//
// The calling thread never waits for a worker that has not joined: items are claimed a grain at a time by
// whoever comes, and the caller closes the job when none are left, then waits only for the workers that
// joined. A worker descheduled by the OS (libgomp's after a prefill, a neighbour) costs speed, never
// progress. An item that throws on the calling thread is rethrown once the workers are done; on a worker
// it ends the process, as an exception escaping an OpenMP region does.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace pagedformers {

// Decode steps of up to this many sequences run their attention on the pool, as their linears (one row a
// sequence: memory-bound, linear.h's kMemoryBoundRows); larger steps stay on OpenMP, as ATen's ops in them.
constexpr int64_t kFewSequences = 4;

// A buffer a job streams from memory (a linear's packed weight), or none.
struct Stream {
  const char* data = nullptr;
  int64_t bytes = 0;
};

using ItemRange = void (*)(const void* context, int64_t begin, int64_t end);

// Runs range(context, ...) over [0, items) in runs of `grain` items on this thread and the pool's workers,
// and returns when all are done. Once done, a worker prefetches the buffer that followed `streams` the last
// time it was streamed. False (nothing run) where the pool is not for this call: fewer than two threads
// (at::get_num_threads, capped at the CPUs the pool's first caller may run on: a worker must not share the
// caller's core), inside a parallel region, or another thread using the pool.
bool pool_run(int64_t items, int64_t grain, ItemRange range, const void* context, Stream streams);

// f(begin, end) over [0, items) in an OpenMP region, claimed `grain` items at a time. Even ranges would tie the
// step to its slowest thread: on a server the event loop, the client and the network preempt one of the threads
// now and then, and its half of the work would wait for it while the other thread sat idle. Claimed, the thread
// that runs takes the rest (served decode steps of 32 sequences on 2 cores: 6-8% faster).
template <typename F>
void openmp_claims(int64_t items, int64_t grain, const F& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t item; (item = next.fetch_add(grain, std::memory_order_relaxed)) < items;)
      f(item, std::min(items, item + grain));
  });
}

// f(begin, end) over [0, items), claimed `grain` items at a time by the threads as they come free (neither
// streams alone at the end while the other waits: +2-3% of bandwidth over an even split): on the pool where
// it takes the call, else inside an OpenMP region.
template <typename F>
void parallel_claims(int64_t items, int64_t grain, const F& f, Stream streams = {}) {
  const ItemRange range = [](const void* context, int64_t begin, int64_t end) {
    (*static_cast<const F*>(context))(begin, end);
  };
  if (!pool_run(items, grain, range, &f, streams)) openmp_claims(items, grain, f);
}

// f(begin, end) over [0, items) where a step of `rows` sequences runs its kernels: on the pool for a few (their
// linears run there), else in an OpenMP region. One OpenMP region in a step that runs on the pool costs more than
// it splits: libgomp's worker then spins without yielding on the core the pool's worker needs, and the linears
// after it stream at one core's speed (2- and 4-row decode steps of the 200M Llama took 10.5-12.9 ms, 1 row 6.5,
// while its logits' widening, and at 3-4 rows its argmax, ran in OpenMP regions; 6.8-9.0 ms without them).
template <typename F>
void step_claims(int64_t rows, int64_t items, int64_t grain, const F& f) {
  if (rows <= kFewSequences) parallel_claims(items, grain, f);
  else openmp_claims(items, grain, f);
}

// at::parallel_for(0, rows, grain, f) for a kernel over a step's rows, but on the pool where the step runs there
// (step_claims' reason) and the rows fill more than one grain; inline where they fit one, as ATen runs them.
template <typename F>
void rows_parallel_for(int64_t rows, int64_t grain, const F& f) {
  if (rows > kFewSequences) at::parallel_for(0, rows, grain, f);
  else if (rows > grain) parallel_claims(rows, grain, f);
  else if (rows > 0) f(0, rows);
}

}  // namespace pagedformers
