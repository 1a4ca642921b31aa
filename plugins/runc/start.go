package runc

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
)

// execFifo is where a created runc container's init waits to be started.
func (r *runcCLI) execFifo(id string) string {
	return filepath.Join(r.root, id, "exec.fifo")
}

// canStartInProcess reports whether starting the container needs nothing
// `runc start` would do besides releasing its init: no poststart hooks
// (runc 1.2 and later runs them at start).
func canStartInProcess(spec *specs.Spec) bool {
	return spec == nil || spec.Hooks == nil || len(spec.Hooks.Poststart) == 0
}

// startInProcess releases a created container's init the way `runc start`
// does, without running runc: it reads the byte init writes into its
// exec.fifo once a reader opens it, then removes the fifo (runc then sees
// the container as running). It returns errNoExecFifo when the container
// has no fifo, so the caller can fall back to `runc start`.
func startInProcess(fifo string, pid int, start uint64) error {
	f, err := os.OpenFile(fifo, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if errors.Is(err, os.ErrNotExist) {
		return errNoExecFifo
	}
	if err != nil {
		return fmt.Errorf("opening exec fifo: %w", err)
	}
	defer f.Close()
	var data []byte
	buf := make([]byte, 8)
	for deadline := time.Now().Add(time.Minute); ; {
		_ = f.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		n, err := f.Read(buf)
		data = append(data, buf[:n]...)
		if err == io.EOF && len(data) > 0 {
			break
		}
		if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) && err != io.EOF {
			return fmt.Errorf("reading exec fifo: %w", err)
		}
		if err == io.EOF || errors.Is(err, os.ErrDeadlineExceeded) {
			// EOF with no data: init has not opened its end yet, or died.
			if st, serr := proc.ReadStat(pid); serr != nil || st.StartTime != start || st.State == 'Z' {
				return fmt.Errorf("container process exited before it was started: %w", errdefs.ErrFailedPrecondition)
			}
			if time.Now().After(deadline) {
				return errors.New("container init did not take the start signal")
			}
			time.Sleep(time.Millisecond)
		}
	}
	return os.Remove(fifo)
}

var errNoExecFifo = errors.New("no exec fifo")
