package wasmhost

import (
	"sync"

	"github.com/tetratelabs/wazero/experimental"
	"golang.org/x/sys/unix"
)

// account tracks linear memory against a limit. Accounts form a chain: a
// container's account charges its pod's, so that both limits hold.
type account struct {
	parent *account

	mu    sync.Mutex
	limit uint64 // 0: none
	used  uint64
	max   uint64 // high-water mark of used
}

func newAccount(parent *account, limit int64) *account {
	a := &account{parent: parent}
	a.setLimit(limit)
	return a
}

func (a *account) setLimit(limit int64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if limit < 0 {
		limit = 0
	}
	a.limit = uint64(limit)
}

// charge adds delta bytes if every limit up the chain allows it.
func (a *account) charge(delta uint64) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.limit != 0 && a.used+delta > a.limit {
		return false
	}
	if a.parent != nil && !a.parent.charge(delta) {
		return false
	}
	a.used += delta
	if a.used > a.max {
		a.max = a.used
	}
	return true
}

// forceCharge adds delta bytes whatever the limits say (memory a module
// needs before it runs at all; it is then killed for it).
func (a *account) forceCharge(delta uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.parent != nil {
		a.parent.forceCharge(delta)
	}
	a.used += delta
	if a.used > a.max {
		a.max = a.used
	}
}

func (a *account) uncharge(delta uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.parent != nil {
		a.parent.uncharge(delta)
	}
	if delta > a.used {
		delta = a.used
	}
	a.used -= delta
}

// usage returns used bytes, the high-water mark and the limit.
func (a *account) usage() (used, max, limit uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.used, a.max, a.limit
}

// allocator gives one module instance its linear memories, charged to acc.
// A growth the account refuses fails, and overLimit is called (once) so the
// instance can be killed for it, as the kernel's OOM killer would.
//
// Memory is reserved with mmap (untouched pages cost nothing) and released
// only by release, once the instance no longer runs: wazero frees a closed
// module's memory at once, even while a call of it may still be executing
// on another thread.
type allocator struct {
	acc       *account
	overLimit func()

	mu       sync.Mutex
	memories []*linearMemory
	fired    bool
}

var _ experimental.MemoryAllocator = (*allocator)(nil)

// maxReservation bounds the address space reserved for one memory: wasm32
// memories never exceed 4 GiB.
const maxReservation = 4 << 30

// Allocate implements experimental.MemoryAllocator.
func (al *allocator) Allocate(initial, maxBytes uint64) experimental.LinearMemory {
	// The whole of what the memory may ever be: the reservation costs
	// address space only (untouched pages are not backed), and a limit may
	// be raised while the module runs.
	reserve := max(maxBytes, initial)
	if reserve > maxReservation || reserve == 0 {
		reserve = maxReservation
	}
	m := &linearMemory{al: al, reserve: reserve}
	al.mu.Lock()
	al.memories = append(al.memories, m)
	al.mu.Unlock()
	return m
}

func (al *allocator) fire() {
	al.mu.Lock()
	fired := al.fired
	al.fired = true
	al.mu.Unlock()
	if !fired && al.overLimit != nil {
		al.overLimit()
	}
}

// release unmaps every memory of the instance and uncharges it. It must be
// called only once nothing runs the instance any more.
func (al *allocator) release() {
	al.mu.Lock()
	mems := al.memories
	al.memories = nil
	al.mu.Unlock()
	for _, m := range mems {
		m.unmap()
	}
}

// linearMemory is one memory of an instance.
type linearMemory struct {
	al      *allocator
	reserve uint64

	mu   sync.Mutex
	buf  []byte // the whole reservation; nil until first used
	size uint64 // bytes charged (the memory's length)
}

// Reallocate implements experimental.LinearMemory: it grows the memory to
// size bytes in place, or returns nil when a limit refuses it.
func (m *linearMemory) Reallocate(size uint64) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.buf == nil {
		if size > m.reserve {
			m.al.fire()
			return nil
		}
		b, err := unix.Mmap(-1, 0, int(m.reserve), unix.PROT_READ|unix.PROT_WRITE,
			unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
		if err != nil {
			m.al.fire()
			return nil
		}
		m.buf = b
		if !m.al.acc.charge(size) {
			// The module's initial memory alone is over the limit: let it
			// be created, so that it is reported killed for memory.
			m.al.acc.forceCharge(size)
			m.al.fire()
		}
		m.size = size
		return m.buf[:size]
	}
	if size <= m.size {
		return m.buf[:size]
	}
	if size > m.reserve || !m.al.acc.charge(size-m.size) {
		m.al.fire()
		return nil
	}
	m.size = size
	return m.buf[:size]
}

// Free implements experimental.LinearMemory. Memory is released by the
// allocator's release instead (see allocator).
func (m *linearMemory) Free() {}

func (m *linearMemory) unmap() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.buf != nil {
		_ = unix.Munmap(m.buf)
		m.buf = nil
	}
	m.al.acc.uncharge(m.size)
	m.size = 0
}
