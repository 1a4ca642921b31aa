package wasmhost

import (
	"io/fs"
	"sync/atomic"

	experimentalsys "github.com/tetratelabs/wazero/experimental/sys"
	"github.com/tetratelabs/wazero/experimental/sysfs"
)

// maxOpenFiles bounds the files one module instance may hold open: every
// instance of the node shares the host's descriptor table.
const maxOpenFiles = 4096

// rootFS is the file system a module sees: the container's root (its
// thread's "/"), with two differences from wazero's own:
//   - files are opened non-blocking: a FIFO in an image or a volume would
//     otherwise block the module's thread in open(2), where no kill reaches
//     it (regular files and directories are switched back to blocking);
//   - an instance may hold at most maxOpenFiles files.
type rootFS struct {
	experimentalsys.FS
	open atomic.Int64
}

func newRootFS() *rootFS {
	return &rootFS{FS: sysfs.DirFS("/")}
}

// OpenFile implements experimentalsys.FS.
func (r *rootFS) OpenFile(path string, flag experimentalsys.Oflag, perm fs.FileMode) (experimentalsys.File, experimentalsys.Errno) {
	if r.open.Add(1) > maxOpenFiles {
		r.open.Add(-1)
		return nil, experimentalsys.EAGAIN // WASI has no EMFILE in wazero's set
	}
	f, errno := r.FS.OpenFile(path, flag|experimentalsys.O_NONBLOCK, perm)
	if errno != 0 {
		r.open.Add(-1)
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
		f.fs.open.Add(-1)
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
