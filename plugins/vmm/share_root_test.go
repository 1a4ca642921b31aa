package vmm

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
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
)

// fakeVMM is a process in a mount namespace of its own, as the keeper
// starts QEMU (CLONE_NEWNS, mounts made private): it plays the hypervisor
// whose namespace the share's mounts go to.
func fakeVMM(t *testing.T, p *pod) {
	t.Helper()
	cmd := exec.Command("sleep", "300")
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	pid := cmd.Process.Pid
	p.st.VM = &hypervisor.State{Pid: pid, StartTime: proc.StartTime(pid)}
}

// fakeJailedVMM is a VMM in mount and PID namespaces of its own, with the
// /proc of its PID namespace, as a jailed QEMU is: the daemon's thread in
// its mount namespace has no entry in that /proc.
func fakeJailedVMM(t *testing.T, p *pod) {
	t.Helper()
	cmd := exec.Command("unshare", "--pid", "--fork", "--mount-proc", "sleep", "300")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	pid := cmd.Process.Pid
	// unshare has joined its new mount namespace once /proc there is the
	// new PID namespace's: its pid 1 is sleep.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/root/proc/1/comm", pid)); err == nil && strings.TrimSpace(string(b)) == "sleep" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the fake jailed VMM did not start")
		}
	}
	p.st.VM = &hypervisor.State{Pid: pid, StartTime: proc.StartTime(pid)}
}

// TestShareInJailedVMM: the daemon attaches and detaches the share's
// mounts in the mount namespace of a VMM whose /proc is its own PID
// namespace's (the jail's).
func TestShareInJailedVMM(t *testing.T) {
	requireRoot(t)
	p := testPod(t)
	fakeJailedVMM(t, p)
	attachAsRootfs(t, p, t.TempDir())
	target := filepath.Join(p.shareDir(), "c1/rootfs")
	vmMounts := func() string {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", p.st.VM.Pid))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	if !strings.Contains(vmMounts(), " "+target+" ") {
		t.Fatalf("not attached in the VMM's namespace:\n%s", vmMounts())
	}
	if err := p.detach("c1"); err != nil {
		t.Fatalf("detaching in the jailed VMM's namespace: %v", err)
	}
	if strings.Contains(vmMounts(), " "+target+" ") {
		t.Errorf("still attached after detach:\n%s", vmMounts())
	}
}

// attachAsRootfs attaches a clone of the mounts at src as container c1's
// rootfs beneath the pod's share, in its VMM's namespace.
func attachAsRootfs(t *testing.T, p *pod, src string) {
	t.Helper()
	if err := makeInShare(p.shareRW(), "c1/rootfs", true); err != nil {
		t.Fatal(err)
	}
	m, err := cloneTree(src, hostBind{}, "c1/rootfs")
	if err != nil {
		t.Fatal(err)
	}
	err = p.attach([]shareMount{m})
	closeTrees([]shareMount{m})
	if err != nil {
		t.Fatal(err)
	}
}

// What the guest writes through 9p lands where QEMU writes: in its mount
// namespace, the share. Inside a container's rootfs or volume that is the
// snapshot's or the volume's file system, which the kubelet accounts
// (ephemeral storage) as for a runc container. But the share's own
// directories (its root, <share>/<id>, <share>/<id>/mounts) are the
// daemon's state directory (<state>/<sandbox>/shared, under /run: a tmpfs
// of the node by default), which nothing accounts: a guest (a container
// that escaped into the guest kernel) fills /run of the node, and every
// daemon of the node that writes there fails. The guest needs nothing
// there: the agent's bundles are in the guest, config.json is written by
// the daemon. In the VM's namespace the share outside the attached mounts
// must be read-only (e.g. a read-only bind of the share onto itself made
// in the hypervisor's namespace before the guest runs; the daemon makes
// the directories and config.json from the node's namespace, and
// move_mount attaches beneath a read-only mount).
func TestGuestCannotWriteShareOutsideMounts(t *testing.T) {
	requireRoot(t)
	p := testPod(t)
	fakeVMM(t, p)
	share := p.shareDir()
	attachAsRootfs(t, p, t.TempDir())
	var inRootfs, atRoot, inCtrDir error
	if err := p.vmMountNS(func() error {
		// As QEMU's 9p server does for the guest.
		inRootfs = os.WriteFile(filepath.Join(share, "c1/rootfs/ok"), []byte("x"), 0o644)
		atRoot = os.WriteFile(filepath.Join(share, "junk"), make([]byte, 1<<20), 0o644)
		inCtrDir = os.WriteFile(filepath.Join(share, "c1/junk"), make([]byte, 1<<20), 0o644)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if inRootfs != nil {
		t.Fatalf("writing in the container's rootfs, as the guest may: %v", inRootfs)
	}
	for rel, err := range map[string]error{"junk": atRoot, "c1/junk": inCtrDir} {
		if err == nil {
			if _, serr := os.Stat(filepath.Join(share, rel)); serr == nil {
				t.Errorf("the guest wrote %s in the share's own directory: it is on the node's state file system (%s), unaccounted", rel, share)
			}
		}
	}
}

// TestShareMountsWithoutDevices: what is attached beneath the share is
// served by the hypervisor without devices, set-uid or exec: a device
// node a guest made in its rootfs (9p passthrough makes real ones) opens
// nothing of the node's in the hypervisor's namespace.
func TestShareMountsWithoutDevices(t *testing.T) {
	requireRoot(t)
	p := testPod(t)
	fakeVMM(t, p)
	src := t.TempDir()
	if err := unix.Mknod(filepath.Join(src, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
		t.Fatal(err)
	}
	if f, err := os.OpenFile(filepath.Join(src, "null"), os.O_WRONLY, 0); err != nil {
		t.Fatalf("the test's own device node does not open on the node (%v): the test cannot tell", err)
	} else {
		f.Close()
	}
	attachAsRootfs(t, p, src)
	var openErr error
	var opts string
	if err := p.vmMountNS(func() error {
		f, err := os.OpenFile(filepath.Join(p.shareDir(), "c1/rootfs/null"), os.O_WRONLY, 0)
		if err == nil {
			f.Close()
		}
		openErr = err
		b, _ := os.ReadFile(procSelf("mountinfo"))
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, " "+filepath.Join(p.shareDir(), "c1/rootfs")+" ") {
				opts = l
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if !errors.Is(openErr, unix.EACCES) {
		t.Errorf("opening a device node of the share in the hypervisor's namespace: %v, want EACCES", openErr)
	}
	for _, o := range []string{"nodev", "nosuid", "noexec"} {
		if !strings.Contains(opts, o) {
			t.Errorf("the attached mount lacks %s: %s", o, opts)
		}
	}
}
