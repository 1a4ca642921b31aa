package vmm

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/moby/sys/mountinfo"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
)

// The guest sees the pod's share (9p, passthrough) read-only but for the
// mounts attached beneath. Were it to write there anyway, whatever it
// left, a symlink in particular, must never lead the daemon to a path of
// the node outside the share. These tests play such a guest by writing in
// the share's own directory.

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("skipping: needs root (mounts)")
	}
}

// victimMount is a tmpfs of the node outside every share, with a submount.
func victimMount(t *testing.T) string {
	t.Helper()
	victim := filepath.Join(t.TempDir(), "victim")
	if err := os.MkdirAll(victim, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", victim, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(victim, "sub")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", sub, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = unix.Unmount(sub, unix.MNT_DETACH)
		_ = unix.Unmount(victim, unix.MNT_DETACH)
	})
	return victim
}

func testPod(t *testing.T) *pod {
	t.Helper()
	sb := &sandbox.Sandbox{ID: "p1", Namespace: "k8s.io", Dir: filepath.Join(t.TempDir(), "sb")}
	p := &pod{k: &kind{}, sb: sb}
	if err := p.prepareShare(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(p.shareDir(), unix.MNT_DETACH) })
	return p
}

func mounted(t *testing.T, path string) bool {
	t.Helper()
	ok, err := mountinfo.Mounted(path)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

func intact(t *testing.T, victim string) {
	t.Helper()
	if !mounted(t, victim) || !mounted(t, filepath.Join(victim, "sub")) {
		t.Errorf("the node's mounts at %s, where the guest's symlink pointed, were unmounted", victim)
	}
}

// A guest that replaces its container's share directory by a symlink to a
// directory of the node must not make the container's Delete unmount
// what is mounted there (a symlink to / would unmount every mount).
func TestUnshareIgnoresGuestSymlink(t *testing.T) {
	requireRoot(t)
	victim := victimMount(t)
	p := testPod(t)
	link := filepath.Join(p.shareRW(), "c1")
	if err := os.Symlink(victim, link); err != nil {
		t.Fatal(err)
	}
	r := &containers{pod: p}
	r.unshare(context.Background(), &task.Container{ID: "c1", Spec: &specs.Spec{}})
	intact(t, victim)
	if _, err := os.Lstat(link); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the guest's symlink is still there: %v", err)
	}
}

// Bind targets are made beneath the share without following a symlink.
func TestShareMountsRefuseGuestSymlink(t *testing.T) {
	requireRoot(t)
	p := testPod(t)
	outside := filepath.Join(t.TempDir(), "outside")
	if err := os.MkdirAll(outside, 0o755); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(p.shareRW(), "c1")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(dir, "mounts")); err != nil {
		t.Fatal(err)
	}
	r := &containers{pod: p}
	for _, src := range []string{t.TempDir(), filepath.Join(t.TempDir(), "file")} {
		if filepath.Base(src) == "file" {
			if err := os.WriteFile(src, nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		ms, err := r.shareMounts(&task.Container{ID: "c1", Spec: &specs.Spec{}}, []hostBind{{Source: src, Target: "mounts/0"}})
		closeTrees(ms)
		if err == nil {
			t.Errorf("a bind target through the guest's symlink: no error")
		}
		if _, err := os.Lstat(filepath.Join(outside, "0")); err == nil {
			t.Fatalf("the daemon created %s, outside the share, through the guest's symlink", filepath.Join(outside, "0"))
		}
	}
}

// A rootfs is mounted in the stage directory, which the guest does not
// see, never at a path of the share: a symlink the guest put at
// <share>/<id>/rootfs neither receives the mount nor is cloned, and making
// the container's rootfs directory refuses it.
func TestRootfsStagedOutsideShare(t *testing.T) {
	requireRoot(t)
	victim := victimMount(t)
	p := testPod(t)
	dir := filepath.Join(p.shareRW(), "c1")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, filepath.Join(dir, "rootfs")); err != nil {
		t.Fatal(err)
	}
	if err := makeInShare(p.shareRW(), "c1/rootfs", true); err == nil {
		t.Errorf("making the rootfs directory over the guest's symlink: no error")
	}
	r := &containers{pod: p}
	c := &task.Container{ID: "c1", Spec: &specs.Spec{}, Rootfs: []task.Mount{{Type: "tmpfs", Source: "tmpfs", Options: []string{"size=1m"}}}}
	ms, err := r.shareMounts(c, nil)
	defer closeTrees(ms)
	if err != nil || len(ms) != 1 {
		t.Fatalf("staging the rootfs: %d trees, %v", len(ms), err)
	}
	intact(t, victim)
	if entries, _ := os.ReadDir(victim); len(entries) != 1 {
		t.Errorf("something was made in %s: %v", victim, entries)
	}
	if _, err := os.Stat(r.stageDir(c)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the stage directory is left: %v", err)
	}
}

func TestWriteInShare(t *testing.T) {
	share := t.TempDir()
	outside := t.TempDir()
	if err := os.Mkdir(filepath.Join(share, "c1"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(share, "c2")); err != nil {
		t.Fatal(err)
	}
	if err := writeInShare(share, "c1/config.json", []byte("{}"), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(share, "c1/config.json")); err != nil || string(b) != "{}" {
		t.Fatalf("written: %q, %v", b, err)
	}
	// Over a symlink to outside: the link is replaced, not followed.
	if err := os.Symlink(filepath.Join(outside, "x"), filepath.Join(share, "c1/over")); err != nil {
		t.Fatal(err)
	}
	if err := writeInShare(share, "c1/over", []byte("a"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := writeInShare(share, "c2/config.json", []byte("{}"), 0o600); err == nil {
		t.Errorf("writing through a symlinked directory: no error")
	}
	if entries, _ := os.ReadDir(outside); len(entries) != 0 {
		t.Errorf("files written outside the share: %v", entries)
	}
}

// unmountBeneath unmounts what is at and beneath rel, and only that.
func TestUnmountBeneath(t *testing.T) {
	requireRoot(t)
	victim := victimMount(t)
	share := t.TempDir()
	for _, rel := range []string{"c1/rootfs", "c1/mounts/0", "c10/rootfs"} {
		if err := makeInShare(share, rel, true); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount("tmpfs", filepath.Join(share, rel), "tmpfs", 0, "size=64k"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = unix.Unmount(filepath.Join(share, rel), unix.MNT_DETACH) })
	}
	if err := os.Symlink(victim, filepath.Join(share, "c1/link")); err != nil {
		t.Fatal(err)
	}
	root, err := openShare(share)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	t.Chdir("/proc") // as vmMountNS runs it
	if err := unmountBeneath(root, "c1"); err != nil {
		t.Fatal(err)
	}
	for rel, want := range map[string]bool{"c1/rootfs": false, "c1/mounts/0": false, "c10/rootfs": true} {
		if got := mounted(t, filepath.Join(share, rel)); got != want {
			t.Errorf("%s mounted: %v, want %v", rel, got, want)
		}
	}
	intact(t, victim)
}
