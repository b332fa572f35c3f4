// Large code tensors in 2 MB pages. A batch-1 GEMV streams each layer's codes once per call, and
// with 4 KB pages it takes a TLB miss every 4 KB (under a hypervisor, a two-level page walk): a
// 4096 x 4096 layer's 4 MB streamed on one thread in 0.45 ms from 4 KB pages and 0.31 ms from
// 2 MB pages (same run, 16 layers cycled; 0.25 ms from cache), on two threads 0.24 vs 0.20 ms.
// torch's CPU allocator asks for huge pages only under THP_MEM_ALLOC_ENABLE=1, process-wide, so
// the CPU backend keeps each large layer's codes here: a new layer's are made here (zeros whose
// pages cost nothing until written), others are moved here once, when it builds the layer's state.
// page_out hands a checkpoint's pages of codes it copied or packed back to the OS.
#include "ops.h"

#include <c10/core/CPUAllocator.h>

#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pyquant {

#if defined(__linux__) && defined(MADV_HUGEPAGE)
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kPage = 4096;

struct Mapping {
  void* addr;
  size_t len;
};

void unmap(void* ctx) {
  auto* m = static_cast<Mapping*>(ctx);
  munmap(m->addr, m->len);
  delete m;
}

// A private anonymous mapping of `bytes` starting on a 2 MB boundary (so that every whole 2 MB of
// it can be one huge page), advised MADV_HUGEPAGE; null if the system refuses the mapping.
Mapping* map_aligned(size_t bytes) {
  const size_t len = (bytes + kPage - 1) / kPage * kPage;
  void* raw = mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePage - 1) & ~(kHugePage - 1);
  const size_t head = aligned - start, tail = kHugePage - head;
  if (head) munmap(raw, head);
  if (tail) munmap(reinterpret_cast<void*>(aligned + len), tail);
  // Advice only: where transparent huge pages are off ("never") the memory is plain 4 KB pages.
  madvise(reinterpret_cast<void*>(aligned), len, MADV_HUGEPAGE);
  return new Mapping{reinterpret_cast<void*>(aligned), len};
}

}  // namespace

bool is_in_huge_pages(const torch::Tensor& t) {
  return t.has_storage() && t.device().is_cpu() && t.storage().data_ptr().get_deleter() == &unmap;
}

torch::Tensor zeros_in_huge_pages(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto options = torch::TensorOptions().dtype(dtype).device(torch::kCPU);
  size_t bytes = c10::elementSize(dtype);
  for (const int64_t d : sizes) {
    TORCH_CHECK_VALUE(d >= 0, "zeros_in_huge_pages: sizes must be >= 0, got ", sizes);
    bytes *= static_cast<size_t>(d);
  }
  Mapping* m = bytes < kHugePage ? nullptr : map_aligned(bytes);
  if (m == nullptr) return torch::zeros(sizes, options);
  // (an anonymous mapping reads as zeros: its pages cost memory only once written)
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, c10::DataPtr(m->addr, m, &unmap, c10::Device(c10::kCPU)),
                       /*allocator=*/nullptr, /*resizable=*/false);
  return torch::empty({0}, options).set_(storage, 0, sizes);
}

torch::Tensor in_huge_pages(const torch::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "in_huge_pages: the tensor must be on the CPU, got ", t.device());
  if (t.nbytes() < kHugePage || is_in_huge_pages(t)) return t;
  auto out = zeros_in_huge_pages(t.sizes(), t.scalar_type());
  if (!is_in_huge_pages(out)) return t;  // the system refused the mapping
  out.copy_(t);
  return out;
}

bool page_out(const torch::Tensor& t) {
#if defined(MADV_PAGEOUT)
  if (!t.has_storage() || !t.device().is_cpu() || t.nbytes() == 0) return false;
  // Anonymous memory of torch's or ours: without swap it cannot go anywhere, and reclaim splits
  // the 2 MB pages of an in_huge_pages mapping trying (the int kernels would stream 4 KB pages).
  if (t.storage().data_ptr().get_deleter() == c10::GetCPUAllocator()->raw_deleter() || is_in_huge_pages(t))
    return false;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr()), end = start + t.nbytes();
  const uintptr_t first = (start + kPage - 1) & ~(kPage - 1), last = end & ~(kPage - 1);
  return last > first && madvise(reinterpret_cast<void*>(first), last - first, MADV_PAGEOUT) == 0;
#else
  return false;
#endif
}

#else  // no transparent huge pages to ask for: the tensor stays where it is

bool page_out(const torch::Tensor&) { return false; }

torch::Tensor zeros_in_huge_pages(at::IntArrayRef sizes, at::ScalarType dtype) {
  return torch::zeros(sizes, torch::TensorOptions().dtype(dtype).device(torch::kCPU));
}

torch::Tensor in_huge_pages(const torch::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "in_huge_pages: the tensor must be on the CPU, got ", t.device());
  return t;
}

bool is_in_huge_pages(const torch::Tensor&) { return false; }

#endif

}  // namespace pyquant
