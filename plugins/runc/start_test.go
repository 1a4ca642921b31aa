package runc

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
)

// A stand-in for runc's init: it blocks opening the fifo for writing until
// a reader comes, writes a byte, and goes on.
func fakeInit(t *testing.T, fifo, script string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sh", "-c", script, "sh", fifo)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

func TestStartInProcess(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "exec.fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := fakeInit(t, fifo, `printf 0 > "$1"; sleep 30`)
	if err := startInProcess(fifo, cmd.Process.Pid, proc.StartTime(cmd.Process.Pid)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(fifo); !os.IsNotExist(err) {
		t.Fatal("the exec fifo must be removed once started (runc then reads the container as running)")
	}
}

func TestStartInProcessDeadInit(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "exec.fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := fakeInit(t, fifo, `exit 0`)
	pid, start := cmd.Process.Pid, proc.StartTime(cmd.Process.Pid)
	cmd.Wait()
	begin := time.Now()
	err := startInProcess(fifo, pid, start)
	if !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("err = %v, want a failed precondition", err)
	}
	if time.Since(begin) > 5*time.Second {
		t.Fatal("took too long to notice the dead init")
	}
}

func TestStartInProcessNoFifo(t *testing.T) {
	if err := startInProcess(filepath.Join(t.TempDir(), "missing"), os.Getpid(), 0); !errors.Is(err, errNoExecFifo) {
		t.Fatalf("err = %v, want errNoExecFifo (fall back to runc start)", err)
	}
}
