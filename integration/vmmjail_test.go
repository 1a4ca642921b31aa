//go:build e2e

package integration

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/moby/sys/mountinfo"
)

// TestVMMHypervisorJailed looks at a pod's QEMU from the node as a guest
// that took it over would find itself: a root holding only what QEMU
// runs from, read-only; the 9p server's capabilities and nothing else, no
// new privileges; no other pod's files, no daemon state, no /etc, no
// privileged process in sight; the share's mounts without devices.
func TestVMMHypervisorJailed(t *testing.T) {
	d, pod, podCfg := vmmPod(t, "vmm-jail", daemonOptions{})
	c := d.run(t, pod, podCfg, ctrConfig("app", "sh", "-c", "echo hi > /from-guest; exec sleep 3600"))
	if out, _, code := d.execSync(t, c, "cat", "/from-guest"); code != 0 || out != "hi\n" {
		t.Fatalf("the VM's container does not work in a jailed VM: %q (exit %d)", out, code)
	}
	// Another pod of the node, whose rootfs and files the VM must not see.
	rCfg := d.podConfig("beside")
	rPod := d.runPod(t, kuasarRunc, rCfg)
	rc := d.run(t, rPod, rCfg, ctrConfig("other", "sleep", "3600"))
	otherRootfs := mountpointWith(t, "/proc/self/mountinfo", rc)

	qemu := d.vmInfo(t, pod).VMPid
	status := procStatus(t, qemu)
	// CHOWN, DAC_OVERRIDE, FOWNER, FSETID, MKNOD, SETFCAP (not
	// DAC_READ_SEARCH: open_by_handle_at would reach any file of the
	// node's file systems).
	const keep = "000000008800001b"
	for k, want := range map[string]string{"CapBnd": keep, "CapEff": keep, "CapPrm": keep, "CapInh": "0000000000000000", "CapAmb": "0000000000000000", "NoNewPrivs": "1", "Uid": "0\t0\t0\t0"} {
		if status[k] != want {
			t.Errorf("QEMU's %s is %q, want %q", k, status[k], want)
		}
	}
	// A PID namespace of its own, where it is 1: it sees and signals
	// neither the node's processes nor other VMs; and network, IPC and
	// UTS namespaces of its own (no loopback service of the node).
	if f := strings.Fields(status["NSpid"]); len(f) != 2 || f[1] != "1" {
		t.Errorf("QEMU's NSpid is %q, want its own PID namespace", status["NSpid"])
	}
	for _, ns := range []string{"net", "ipc", "uts", "mnt"} {
		node, _ := os.Readlink("/proc/self/ns/" + ns)
		if own, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/%s", qemu, ns)); err != nil || own == node {
			t.Errorf("QEMU's %s namespace is the node's (%s, %v)", ns, own, err)
		}
	}

	root := fmt.Sprintf("/proc/%d/root", qemu)
	entries, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	t.Logf("QEMU's root: %v", names)
	for _, p := range []string{
		"/etc/shadow", "/etc/passwd", "/root", "/home", "/var/lib", "/run/containerd", "/sys",
		filepath.Join(d.Dir, "root"),        // containerd's content and snapshots
		filepath.Join(d.Dir, "config.toml"), // the daemon's config
		filepath.Join(d.Dir, "state", "k"),  // the keeper's sockets
		otherRootfs,                         // another pod's rootfs
	} {
		if _, err := os.Lstat(root + p); err == nil {
			t.Errorf("QEMU sees the node's %s", p)
		}
	}
	mounts := readMountinfo(t, fmt.Sprintf("/proc/%d/mountinfo", qemu))
	for _, m := range mounts {
		opts := strings.Split(m.Options, ",")
		has := func(o string) bool { return slices.Contains(opts, o) }
		switch {
		case m.Mountpoint == "/" || m.Mountpoint == "/usr" || slices.Contains([]string{"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/kvm"}, m.Mountpoint):
			// Device nodes too: opened as they are, not chmod-ed.
			if !has("ro") {
				t.Errorf("QEMU's %s is writable: %s", m.Mountpoint, m.Options)
			}
		case m.Mountpoint == "/proc":
			// What QEMU's reads of /proc show: only processes it could
			// trace (none of the node's privileged ones).
			if !strings.Contains(m.VFSOptions, "hidepid=ptraceable") {
				t.Errorf("QEMU's /proc shows the node's processes: %s", m.VFSOptions)
			}
		case strings.Contains(m.Mountpoint, "/shared"):
			if !has("nodev") || !has("nosuid") {
				t.Errorf("QEMU serves %s with devices or set-uid: %s", m.Mountpoint, m.Options)
			}
		}
	}
	if !slices.ContainsFunc(mounts, func(m *mountinfo.Info) bool { return strings.Contains(m.Mountpoint, "/shared/") }) {
		t.Errorf("no container mount beneath the share in QEMU's namespace")
	}
	// A removed container's mounts leave QEMU's namespace (the daemon
	// works in it through the node's /proc: the jail's shows QEMU's PID
	// namespace only).
	d.stopRemove(t, c, 2)
	for _, m := range readMountinfo(t, fmt.Sprintf("/proc/%d/mountinfo", qemu)) {
		if strings.Contains(m.Mountpoint, "/shared/"+c) {
			t.Errorf("a removed container's mount is still in QEMU's namespace: %s", m.Mountpoint)
		}
	}
	d.removePod(t, rPod)
	d.removePod(t, pod)
}

// readMountinfo is the mount table at path (a /proc/PID/mountinfo).
func readMountinfo(t *testing.T, path string) []*mountinfo.Info {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	ms, err := mountinfo.GetMountsFromReader(f, nil)
	if err != nil {
		t.Fatal(err)
	}
	return ms
}

// mountpointWith is the first mount point of path's table that names s.
func mountpointWith(t *testing.T, path, s string) string {
	t.Helper()
	for _, m := range readMountinfo(t, path) {
		if strings.Contains(m.Mountpoint, s) {
			return m.Mountpoint
		}
	}
	t.Fatalf("no mount of %s in %s", s, path)
	return ""
}

// procStatus is /proc/PID/status as a map.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			out[k] = strings.TrimSpace(v)
		}
	}
	return out
}
