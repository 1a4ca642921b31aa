package appkernel

import (
	"bytes"
	"debug/elf"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
)

func TestIdleProgramLayout(t *testing.T) {
	b, err := idleProgram("amd64")
	if err != nil {
		t.Fatal(err)
	}
	f, err := elf.NewFile(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if f.Machine != elf.EM_X86_64 || f.Type != elf.ET_EXEC || len(f.Progs) != 1 {
		t.Fatalf("machine %v type %v progs %d", f.Machine, f.Type, len(f.Progs))
	}
	p := f.Progs[0]
	if p.Type != elf.PT_LOAD || p.Flags != elf.PF_R|elf.PF_X || p.Filesz != uint64(len(b)) || p.Vaddr != idleBase {
		t.Errorf("segment %+v", p.ProgHeader)
	}
	code := f.Entry - idleBase
	if int(code) != 64+56 || !bytes.Equal(b[code:code+uint64(len(idleCodeAMD64))], idleCodeAMD64) {
		t.Errorf("entry %#x", f.Entry)
	}
	if len(idleCodeAMD64)%8 != 0 || idleCodeAMD64[idleHandlerOff] != 0xc3 || idleCodeAMD64[idleRestorerOff] != 0xb8 {
		t.Error("code layout: the data must follow 8-byte aligned, handler and restorer at their offsets")
	}
	if _, err := idleProgram("arm64"); !errdefs.IsNotImplemented(err) {
		t.Errorf("arm64: %v", err)
	}
}

// TestIdleProgramRuns runs the program as the init of a PID namespace of
// its own, as it is in a sandbox: it must sleep, reap an orphan, and die
// on SIGKILL.
func TestIdleProgramRuns(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skipf("the idle program exists for amd64 only, this is %s", runtime.GOARCH)
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root, to make a PID namespace (the e2e tests run it in gVisor)")
	}
	b, err := idleForHost()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "idle")
	if err := os.WriteFile(path, b, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer cmd.Process.Kill()
	pid := cmd.Process.Pid

	// Sleeping in rt_sigsuspend (130).
	waitFor(t, "the program to sleep in rt_sigsuspend", func() bool {
		s, _ := os.ReadFile(fmt.Sprintf("/proc/%d/syscall", pid))
		return strings.HasPrefix(string(s), "130 ")
	})

	// An orphan in its namespace: a shell that starts a sleep and exits.
	// The sleep's parent becomes the program, which must reap it.
	sh := exec.Command("nsenter", "-t", strconv.Itoa(pid), "-p", "--", "/bin/sh", "-c", "sleep 0.2 & echo $!")
	out, err := sh.Output()
	if err != nil {
		t.Fatalf("starting an orphan: %v", err)
	}
	if strings.TrimSpace(string(out)) == "" {
		t.Fatal("no orphan pid")
	}
	waitFor(t, "the orphan to be reaped", func() bool { return len(proc.ChildPids(pid, true)) == 0 })
	select {
	case err := <-exited:
		t.Fatalf("the program exited: %v", err)
	default:
	}

	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := <-exited; err == nil || !strings.Contains(err.Error(), "killed") {
		t.Errorf("after SIGKILL: %v", err)
	}
}

// waitFor polls cond until it holds; it fails the test after a long
// while (a hang, not a timing expectation).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}
