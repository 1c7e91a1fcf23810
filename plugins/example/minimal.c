/* minimal.c: the smallest complete edge plugin. It passes every batch through unchanged.
 *
 * Build: clang --target=wasm32-wasi -O2 -nostdlib -Wl,--no-entry -Wl,--strip-all \
 *          -o minimal.wasm minimal.c
 */
#include <stdint.h>

/* The linker's symbol for the first byte after static data and the stack. */
extern unsigned char __heap_base;

/* alloc(len): room for len bytes of input. Every call starts a new request, so the
 * heap is rewound to its base each time (a one-block bump allocator). */
__attribute__((export_name("alloc"))) uint32_t alloc(uint32_t len)
{
    uint64_t p = ((uintptr_t)&__heap_base + 7) & ~(uint64_t)7;
    uint64_t end = p + len;
    uint64_t have = (uint64_t)__builtin_wasm_memory_size(0) * 65536;
    if (end > have &&
        __builtin_wasm_memory_grow(0, (uintptr_t)((end - have + 65535) / 65536)) == (uintptr_t)-1)
        return 0; /* no more memory (limits.memory_pages) */
    return (uint32_t)p;
}

/* process(ptr, len): the batch is the JSON array at ptr; the result is
 * (out_ptr << 32) | out_len. Here the output is the input itself: it stays valid
 * until the next alloc. Returning 0 would drop the whole batch. */
__attribute__((export_name("process"))) int64_t process(uint32_t ptr, uint32_t len)
{
    return (int64_t)(((uint64_t)ptr << 32) | len);
}
