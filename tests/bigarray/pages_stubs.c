/* OCaml 4's page table, read by test_ba_pages.ml: the kind of a page, and how many
   entries the table holds. On OCaml 5 (no page table) both answer -1.

   The entry count (`occupancy` of memory.c's `static struct page_table caml_page_table`)
   has no accessor, and ocamlrun is stripped: the structure is found by its invariants
   in the executable's writable memory (data and bss), and the find is checked by
   counting the entries it points to. */

#define _GNU_SOURCE
#include <caml/alloc.h>
#include <caml/fail.h>
#include <caml/address_class.h>
#include <caml/mlvalues.h>
#include <caml/version.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* The kind of the page holding the address [addr] (a nativeint): a bit set of In_heap
   1, In_young 2, In_static_data 4, In_code_area 8; 0 when not in the table. */
value test_page_kind(value addr)
{
#if OCAML_VERSION_MAJOR >= 5
  (void)addr;
  return Val_int(-1);
#else
  return Val_int(caml_page_table_lookup((void *)Nativeint_val(addr)));
#endif
}

/* The address of a block as a nativeint. */
value test_address(value v)
{
  return caml_copy_nativeint((intnat)v);
}

#if OCAML_VERSION_MAJOR < 5
/* memory.c's struct page_table (64-bit hash table). */
struct page_table {
  uintnat size;
  int shift;
  uintnat mask;
  uintnat occupancy;
  uintnat *entries;
};

/* Whether [t] looks like the page table: a power-of-two size with its mask and shift,
   at most half full (memory.c resizes before that), and exactly [occupancy] entries
   in use. */
static int is_page_table(const struct page_table *t)
{
  uintnat size = t->size;
  if (size < 2 || (size & (size - 1)) != 0 || t->mask != size - 1) return 0;
  if (t->occupancy > size / 2 || t->entries == NULL) return 0;
  if (((uintnat)t->entries & (sizeof(uintnat) - 1)) != 0) return 0;
  int log = 0;
  while (((uintnat)1 << log) < size) log++;
  if (t->shift != (int)(8 * sizeof(uintnat)) - log) return 0;
  uintnat used = 0;
  for (uintnat i = 0; i < size; i++)
    if (t->entries[i] != 0) used++;
  return used == t->occupancy;
}

static struct page_table *table;

/* Scans the executable's writable mappings (and the anonymous one right after them:
   the rest of the bss). */
static struct page_table *find_table(void)
{
  char exe[4096];
  ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
  if (n <= 0) return NULL;
  exe[n] = 0;
  FILE *maps = fopen("/proc/self/maps", "r");
  if (maps == NULL) return NULL;
  char line[8192];
  int after_exe = 0;
  struct page_table *found = NULL;
  while (found == NULL && fgets(line, sizeof line, maps) != NULL) {
    unsigned long start, end;
    char perms[8];
    int path_at = 0;
    if (sscanf(line, "%lx-%lx %7s %*s %*s %*s %n", &start, &end, perms, &path_at) < 3)
      continue;
    char *path = line + path_at;
    path[strcspn(path, "\n")] = 0;
    int is_exe = strcmp(path, exe) == 0;
    int candidate = perms[0] == 'r' && perms[1] == 'w' && (is_exe || (after_exe && *path == 0));
    after_exe = is_exe;
    if (!candidate) continue;
    for (uintnat a = start; a + sizeof(struct page_table) <= end; a += sizeof(uintnat))
      if (is_page_table((struct page_table *)a)) {
        found = (struct page_table *)a;
        break;
      }
  }
  fclose(maps);
  return found;
}
#endif

/* The entries in use in the page table (pages removed stay as entries of kind 0: the
   table never shrinks); -1 on OCaml 5; raises Failure when the table is not found. */
value test_page_table_occupancy(value unit)
{
  (void)unit;
#if OCAML_VERSION_MAJOR >= 5
  return Val_int(-1);
#else
  if (table == NULL || !is_page_table(table)) table = find_table();
  if (table == NULL) caml_failwith("test_page_table_occupancy: page table not found");
  return Val_long(table->occupancy);
#endif
}

/* An allocator that never gives the same page twice: it bumps through one reservation
   of ARENA_BYTES, each allocation starting on a fresh page one page after the last
   one's end; free gives the memory back to the kernel (MADV_DONTNEED) and keeps the
   addresses. Copies made with it land where no copy was before. */
#define ARENA_BYTES ((size_t)1 << 30)
static char *arena, *arena_next;

static void *arena_alloc(value a, size_t size)
{
  (void)a;
  size_t pages = (size + 4095) / 4096 + 1;
  if (arena_next == NULL || (size_t)(arena + ARENA_BYTES - arena_next) < pages * 4096)
    return NULL;
  char *p = arena_next;
  arena_next += pages * 4096;
  return p;
}

static void arena_free(value a, void *ptr, size_t size)
{
  (void)a;
  madvise(ptr, (size + 4095) / 4096 * 4096, MADV_DONTNEED);
}

/* The arena allocator's block (Offheap.alloc); raises Failure when the reservation
   fails. */
value test_arena_alloc(value unit)
{
  (void)unit;
  if (arena == NULL) {
    void *p = mmap(NULL, ARENA_BYTES, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) caml_failwith("test_arena_alloc: mmap");
    arena = arena_next = p;
  }
  value block = caml_alloc_small(2, Abstract_tag);
  Field(block, 0) = (value)arena_alloc;
  Field(block, 1) = (value)arena_free;
  return block;
}
