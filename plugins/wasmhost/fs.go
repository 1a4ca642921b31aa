package wasmhost

import (
	"io/fs"
	"sync"
	"sync/atomic"

	experimentalsys "github.com/tetratelabs/wazero/experimental/sys"
	"github.com/tetratelabs/wazero/experimental/sysfs"
	"golang.org/x/sys/unix"
)

// maxOpenFiles bounds the files one module instance may hold open.
const maxOpenFiles = 4096

// fileBudget bounds the files all the module instances of the host hold
// open together: they share the host's one descriptor table, so a cap per
// instance alone would let a few instances take every descriptor the host
// has (and with them its sockets, its FIFOs, its next container).
type fileBudget struct {
	max  int64
	open atomic.Int64
}

// newFileBudget gives modules limit files (0: half of the host's
// RLIMIT_NOFILE, the other half being kept for the host's own descriptors:
// its clients, the containers' standard streams, sockets and namespaces).
func newFileBudget(limit int64) *fileBudget {
	if limit <= 0 {
		var rl unix.Rlimit
		limit = 512 // half of the usual default of 1024
		if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err == nil && rl.Cur > 0 {
			limit = int64(min(rl.Cur, 1<<30) / 2) // RLIM_INFINITY: no limit worth the name
		}
	}
	return &fileBudget{max: limit}
}

func (b *fileBudget) take() bool {
	if b.open.Add(1) > b.max {
		b.open.Add(-1)
		return false
	}
	return true
}

func (b *fileBudget) give(n int64) { b.open.Add(-n) }

// rootFS is the file system a module sees: the container's root (its
// thread's "/"), with these differences from wazero's own:
//   - files are opened non-blocking: a FIFO in an image or a volume would
//     otherwise block the module's thread in open(2), where no kill reaches
//     it (regular files and directories are switched back to blocking);
//   - an instance may hold at most maxOpenFiles files, and all instances
//     together what the host's fileBudget allows.
type rootFS struct {
	experimentalsys.FS
	budget *fileBudget

	mu       sync.Mutex
	open     int64
	released bool // the instance is gone: its count is back in the budget
}

func newRootFS(b *fileBudget) *rootFS {
	return &rootFS{FS: sysfs.DirFS("/"), budget: b}
}

func (r *rootFS) take() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.released || r.open >= maxOpenFiles || !r.budget.take() {
		return false
	}
	r.open++
	return true
}

func (r *rootFS) give() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.released {
		return
	}
	r.open--
	r.budget.give(1)
}

// release gives back to the host's budget whatever the instance still
// counts (files wazero did not close through it); it runs once the
// instance no longer runs.
func (r *rootFS) release() {
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.released {
		r.released = true
		r.budget.give(r.open)
		r.open = 0
	}
}

// OpenFile implements experimentalsys.FS.
func (r *rootFS) OpenFile(path string, flag experimentalsys.Oflag, perm fs.FileMode) (experimentalsys.File, experimentalsys.Errno) {
	if !r.take() {
		return nil, experimentalsys.EAGAIN // WASI has no EMFILE in wazero's set
	}
	f, errno := r.FS.OpenFile(path, flag|experimentalsys.O_NONBLOCK, perm)
	if errno != 0 {
		r.give()
		return nil, errno
	}
	if flag&experimentalsys.O_NONBLOCK == 0 {
		if st, errno := f.Stat(); errno == 0 && (st.Mode.IsRegular() || st.Mode.IsDir()) {
			if pf, ok := f.(experimentalsys.PollableFile); ok {
				_ = pf.SetNonblock(false)
			}
		}
	}
	return &countedFile{File: f, fs: r}, 0
}

// countedFile gives its slot back when closed.
type countedFile struct {
	experimentalsys.File
	fs     *rootFS
	closed atomic.Bool
}

// Close implements experimentalsys.File.
func (f *countedFile) Close() experimentalsys.Errno {
	if f.closed.CompareAndSwap(false, true) {
		f.fs.give()
	}
	return f.File.Close()
}

// IsNonblock, SetNonblock and Poll pass through to the file, for wazero's
// fd_fdstat and poll support.
func (f *countedFile) IsNonblock() bool {
	if pf, ok := f.File.(experimentalsys.PollableFile); ok {
		return pf.IsNonblock()
	}
	return false
}

// SetNonblock implements experimentalsys.PollableFile.
func (f *countedFile) SetNonblock(enable bool) experimentalsys.Errno {
	if pf, ok := f.File.(experimentalsys.PollableFile); ok {
		return pf.SetNonblock(enable)
	}
	return experimentalsys.ENOSYS
}

// Poll implements experimentalsys.Pollable.
func (f *countedFile) Poll(flag experimentalsys.Pflag, timeoutMillis int32) (bool, experimentalsys.Errno) {
	if p, ok := f.File.(experimentalsys.Pollable); ok {
		return p.Poll(flag, timeoutMillis)
	}
	return false, experimentalsys.ENOSYS
}
