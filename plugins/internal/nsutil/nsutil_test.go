package nsutil

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
)

func TestSysctlNamespace(t *testing.T) {
	tests := []struct {
		name string
		want Kind
	}{
		{"net.ipv4.ip_forward", Net},
		{"kernel.shm_rmid_forced", IPC},
		{"fs.mqueue.msg_max", IPC},
		{"kernel.domainname", UTS},
		{"kernel.pid_max", ""},
		{"vm.swappiness", ""},
	}
	for _, tt := range tests {
		if got := SysctlNamespace(tt.name); got != tt.want {
			t.Errorf("SysctlNamespace(%q) = %q, want %q", tt.name, got, tt.want)
		}
	}
}

func TestApplySysctlsRejects(t *testing.T) {
	tests := []struct {
		name    string
		paths   map[Kind]string
		sysctls map[string]string
	}{
		{"not namespaced", map[Kind]string{IPC: "/x"}, map[string]string{"kernel.pid_max": "1"}},
		{"host namespace", map[Kind]string{IPC: "/x"}, map[string]string{"net.ipv4.ip_forward": "1"}},
		{"traversal", map[Kind]string{Net: "/x"}, map[string]string{"net/../../kernel": "1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := ApplySysctls(tt.paths, tt.sysctls); err == nil {
				t.Fatal("expected an error")
			}
		})
	}
}

// Needs root (the project's tests run as root, as on nodes).
func TestCreatePinsNamespaces(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: creating namespaces needs root")
	}
	dir := t.TempDir()
	paths, err := Create(dir, []Kind{IPC, UTS}, "pod-host")
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, p := range paths {
			if err := Release(p); err != nil {
				t.Error(err)
			}
		}
		if IsPinned(filepath.Join(dir, "uts")) {
			t.Error("uts still pinned after release")
		}
	}()
	for _, k := range []Kind{IPC, UTS} {
		if !IsPinned(paths[k]) {
			t.Fatalf("%s not pinned", k)
		}
	}
	self, _ := os.Readlink("/proc/self/ns/uts")
	pinned := ""
	err = Do(map[Kind]string{UTS: paths[UTS]}, func() error {
		var u unix.Utsname
		if err := unix.Uname(&u); err != nil {
			return err
		}
		pinned = strings.TrimRight(string(u.Nodename[:]), "\x00")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if pinned != "pod-host" {
		t.Fatalf("hostname in pod UTS namespace = %q", pinned)
	}
	const knob = "/proc/sys/kernel/shm_rmid_forced"
	before, _ := os.ReadFile(knob)
	want := "1"
	if strings.TrimSpace(string(before)) == "1" {
		want = "0"
	}
	if err := ApplySysctls(map[Kind]string{IPC: paths[IPC]}, map[string]string{"kernel.shm_rmid_forced": want}); err != nil {
		t.Fatal(err)
	}
	var inside []byte
	if err := Do(map[Kind]string{IPC: paths[IPC]}, func() (err error) { inside, err = os.ReadFile(knob); return }); err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile(knob)
	if strings.TrimSpace(string(inside)) != want || string(after) != string(before) {
		t.Fatalf("sysctl inside = %q (want %q), host %q -> %q", inside, want, before, after)
	}
	if now, _ := os.Readlink("/proc/self/ns/uts"); now != self {
		t.Fatal("the calling thread's namespace changed")
	}
}

func TestPinOf(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to bind-mount namespace files")
	}
	dir := t.TempDir()
	self := os.Getpid()
	st, err := proc.ReadStat(self)
	if err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(dir, "pid")
	if err := PinOf(self, st.StartTime+1, PID, target); !errors.Is(err, unix.ESRCH) {
		t.Fatalf("pinning with a wrong start time: %v", err)
	}
	if err := PinOf(self, st.StartTime, PID, target); err != nil {
		t.Fatal(err)
	}
	defer Release(target)
	want, _ := os.Readlink(ProcPath(self, "pid"))
	var a, b unix.Stat_t
	if err := unix.Stat(target, &a); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(ProcPath(self, "pid"), &b); err != nil || a.Ino != b.Ino {
		t.Fatalf("pinned %d, want the namespace %s (%d): %v", a.Ino, want, b.Ino, err)
	}
}

// TestDoMountNamespace: a mount made by Do in another process's mount
// namespace is there and not in ours.
func TestDoMountNamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to join a mount namespace")
	}
	dir := t.TempDir()
	cmd := exec.Command("sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	before, _ := os.Readlink("/proc/self/ns/mnt")
	err := Do(map[Kind]string{Mnt: ProcPath(cmd.Process.Pid, "mnt")}, func() error {
		return unix.Mount("tmpfs", dir, "tmpfs", 0, "size=64k")
	})
	if err != nil {
		t.Fatal(err)
	}
	if after, _ := os.Readlink("/proc/self/ns/mnt"); after != before {
		t.Fatalf("our mount namespace changed: %s, was %s", after, before)
	}
	has := func(mountinfo string) bool {
		b, err := os.ReadFile(mountinfo)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Contains(string(b), " "+dir+" ")
	}
	if !has(fmt.Sprintf("/proc/%d/mountinfo", cmd.Process.Pid)) {
		t.Errorf("the mount is not in the other namespace")
	}
	if has("/proc/self/mountinfo") {
		unix.Unmount(dir, unix.MNT_DETACH)
		t.Errorf("the mount leaked into ours")
	}
	if err := Do(map[Kind]string{"cgroup": "/proc/self/ns/cgroup"}, func() error { return nil }); err == nil {
		t.Errorf("joining an unsupported kind: no error")
	}
}
