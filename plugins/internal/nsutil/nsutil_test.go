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
	"time"

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
		t.Fatal("the main thread's namespace changed")
	}
}

// TestThreadsGoBack: the threads Create and Do use are back in the node's
// namespaces when they return (a thread left in a pod's namespace and
// parked by the runtime, as the main thread is, makes /proc/self show the
// pod's namespaces to the whole process), and the mount namespace thread
// of Do is not handed back.
func TestThreadsGoBack(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: creating namespaces needs root")
	}
	want := map[string]string{}
	for _, k := range []string{"uts", "ipc", "net", "mnt"} {
		want[k], _ = os.Readlink("/proc/self/ns/" + k)
	}
	inOwn := func(tid int) error {
		for k, w := range want {
			got, err := os.Readlink(fmt.Sprintf("/proc/self/task/%d/ns/%s", tid, k))
			if err != nil {
				return err
			}
			if got != w {
				return fmt.Errorf("thread %d is in %s, want %s", tid, got, w)
			}
		}
		return nil
	}
	for i := 0; i < 20; i++ {
		dir := t.TempDir()
		paths, err := Create(dir, []Kind{IPC, UTS, Net}, "pod")
		if err != nil {
			t.Fatal(err)
		}
		tid := 0
		err = Do(paths, func() error { tid = unix.Gettid(); return nil })
		for _, p := range paths {
			Release(p)
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := inOwn(tid); err != nil {
			t.Fatalf("after Do: %v", err)
		}
	}
	cmd := exec.Command("sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	tid := 0
	if err := Do(map[Kind]string{Mnt: ProcPath(cmd.Process.Pid, "mnt")}, func() error { tid = unix.Gettid(); return nil }); err != nil {
		t.Fatal(err)
	}
	// The thread ends (in its own namespaces until then), or, if it was the
	// main thread, is parked back in them.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		err := inOwn(tid)
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ESRCH) || errors.Is(err, os.ErrPermission) { // gone or exiting
			break
		}
		if err != nil {
			t.Fatalf("mount namespace thread: %v", err)
		}
		if tid == os.Getpid() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the thread that joined a mount namespace (own root and cwd) is still in use")
		}
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
