package agent

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
)

// TestReleaseInit plays runc init's side of the exec fifo.
func TestReleaseInit(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()

	if err := releaseInit(ctx, filepath.Join(dir, "none"), -1); !errors.Is(err, errNoExecFifo) {
		t.Errorf("no fifo: %v", err)
	}

	// init waits for a reader, writes its byte and execs (closes).
	fifo := filepath.Join(dir, "exec.fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	wrote := make(chan error, 1)
	go func() {
		f, err := os.OpenFile(fifo, os.O_WRONLY, 0)
		if err == nil {
			_, err = f.Write([]byte("0"))
			f.Close()
		}
		wrote <- err
	}()
	self, err := unix.PidfdOpen(os.Getpid(), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(self)
	if err := releaseInit(ctx, fifo, self); err != nil {
		t.Fatalf("releaseInit: %v", err)
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(fifo); !os.IsNotExist(err) {
		t.Errorf("the fifo is still there (runc would see the container created): %v", err)
	}

	// init died before it opened the fifo: its pidfd ends the wait.
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("true")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pidfd, err := unix.PidfdOpen(cmd.Process.Pid, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(pidfd)
	cmd.Wait()
	if err := releaseInit(ctx, fifo, pidfd); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("releaseInit of a dead init: %v", err)
	}
}

func TestSealedBinary(t *testing.T) {
	bin, err := exec.LookPath("true")
	if err != nil {
		t.Fatalf("no true(1) to copy: %v", err)
	}
	path, f, err := sealedBinary(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := exec.Command(path).Run(); err != nil {
		t.Errorf("running the sealed copy %s: %v", path, err)
	}
	seals, err := unix.FcntlInt(f.Fd(), unix.F_GET_SEALS, 0)
	if err != nil || seals != runcSeals {
		t.Errorf("seals %#x (%v), want %#x: runc would copy itself again", seals, err, runcSeals)
	}
	if _, err := f.WriteAt([]byte("x"), 0); err == nil {
		t.Error("the sealed copy is writable")
	}
}

func TestPodCgroup(t *testing.T) {
	for _, tc := range []struct {
		groups []string
		want   string
	}{
		{nil, guest.CgroupParent},
		{[]string{"/kuasar/a", "/kuasar/b"}, "/kuasar"},
		{[]string{"/pod1/a"}, "/pod1"},
		{[]string{"/kuasar/a", "/other/b"}, guest.CgroupParent},
		{[]string{"/a"}, guest.CgroupParent},
	} {
		r := &containers{env: specEnv{cgroupParent: guest.CgroupParent}, ctrs: map[string]*ctrData{}}
		for i, g := range tc.groups {
			r.ctrs[string(rune('a'+i))] = &ctrData{cgroup: g}
		}
		if got := r.podCgroup(); got != tc.want {
			t.Errorf("podCgroup of %v = %q, want %q", tc.groups, got, tc.want)
		}
	}
}

// TestSealRunc: runc calls wait for the sealed copy, which replaces the
// file.
func TestSealRunc(t *testing.T) {
	ctx := context.Background()
	src, err := exec.LookPath("true")
	if err != nil {
		t.Fatalf("no true(1) to copy: %v", err)
	}
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "runc")
	if err := os.WriteFile(file, data, 0o755); err != nil {
		t.Fatal(err)
	}
	b := sealRunc(file)
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := b.Path(canceled); !errors.Is(err, context.Canceled) {
		t.Errorf("Path before the seal: %v, want to wait", err)
	}
	b.seal(ctx)
	defer b.file.Close()
	path, err := b.Path(ctx)
	if err != nil || path == file {
		t.Fatalf("Path = %q, %v", path, err)
	}
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Errorf("the file is still there: %v", err)
	}
	if err := exec.Command(path).Run(); err != nil {
		t.Errorf("running %s: %v", path, err)
	}
	if p, err := plainRunc(file).Path(canceled); err != nil || p != file {
		t.Errorf("plain runc: %q, %v", p, err)
	}
}
