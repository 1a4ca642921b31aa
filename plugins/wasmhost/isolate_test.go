package wasmhost

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost/api"
)

func TestParseMountOptions(t *testing.T) {
	tests := []struct {
		opts []string
		want mountOptions
	}{
		{[]string{"rbind", "ro"}, mountOptions{flags: unix.MS_BIND | unix.MS_REC | unix.MS_RDONLY, bind: true, recursive: true, readonly: true}},
		{[]string{"rbind", "rro"}, mountOptions{flags: unix.MS_BIND | unix.MS_REC | unix.MS_RDONLY, bind: true, recursive: true, readonly: true, recursiveReadonly: true}},
		{[]string{"bind", "rw", "nosuid", "noexec"}, mountOptions{flags: unix.MS_BIND | unix.MS_NOSUID | unix.MS_NOEXEC, bind: true,
			attr: unix.MOUNT_ATTR_NOSUID | unix.MOUNT_ATTR_NOEXEC}},
		{[]string{"size=1m", "mode=755", "X-kuasar", "rprivate"}, mountOptions{data: []string{"size=1m", "mode=755"}}},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.opts, ","), func(t *testing.T) {
			got := parseMountOptions(tt.opts)
			if got.flags != tt.want.flags || got.attr != tt.want.attr || got.bind != tt.want.bind || got.recursive != tt.want.recursive ||
				got.readonly != tt.want.readonly || got.recursiveReadonly != tt.want.recursiveReadonly || strings.Join(got.data, ",") != strings.Join(tt.want.data, ",") {
				t.Fatalf("parseMountOptions(%v) = %+v, want %+v", tt.opts, got, tt.want)
			}
		})
	}
}

// TestRecursiveReadOnly: "rro" makes a volume and every mount inside it
// read-only; "ro" only the volume's own mount (as OCI runtimes do).
func TestRecursiveReadOnly(t *testing.T) {
	f := newFixture(t)
	vol := filepath.Join(f.dir, "rrovol")
	sub := filepath.Join(vol, "sub")
	if err := os.MkdirAll(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", sub, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(sub, unix.MNT_DETACH) })
	for _, tc := range []struct {
		opt    string
		path   string
		status int
		want   string
	}{
		{"rro", "/v/top", 1, "read-only file system"},
		{"rro", "/v/sub/x", 1, "read-only file system"},
		{"ro", "/v/top", 1, "read-only file system"},
		{"ro", "/v/sub/x", 0, "wrote /v/sub/x"},
	} {
		t.Run(tc.opt+" "+tc.path, func(t *testing.T) {
			e, out := f.run(func(r *api.CreateRequest) {
				r.Mounts = []*api.Mount{{Type: "bind", Source: vol, Destination: "/v", Options: []string{"rbind", tc.opt}}}
			}, "write", tc.path, "x")
			if int(e.GetStatus()) != tc.status || !strings.Contains(strings.ToLower(out), tc.want) {
				t.Fatalf("status %d (want %d), output:\n%s\nwant %q", e.GetStatus(), tc.status, out, tc.want)
			}
		})
	}
}

// TestMountTargetRace: a container that shares a volume swaps a directory
// of it for a symlink out of the rootfs, over and over, while containers
// mount another volume below that directory. The mount point is resolved
// and made through handles inside the rootfs: nothing is ever made where
// the symlink points.
func TestMountTargetRace(t *testing.T) {
	f := newFixture(t)
	shared := filepath.Join(f.dir, "shared")
	outside := filepath.Join(f.dir, "outside")
	src := filepath.Join(f.dir, "src")
	for _, d := range []string{filepath.Join(shared, "dir"), outside, src} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink(outside, filepath.Join(shared, "link")); err != nil {
		t.Fatal(err)
	}
	var stop atomic.Bool
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for !stop.Load() {
			_ = unix.Renameat2(unix.AT_FDCWD, filepath.Join(shared, "dir"), unix.AT_FDCWD, filepath.Join(shared, "link"), unix.RENAME_EXCHANGE)
		}
	}()
	const attempts = 100
	escaped := 0
	for i := 0; i < attempts && escaped == 0; i++ {
		_, _, err := f.create(func(r *api.CreateRequest) {
			r.Mounts = []*api.Mount{
				{Type: "bind", Source: shared, Destination: "/shared", Options: []string{"rbind"}},
				{Type: "bind", Source: src, Destination: "/shared/dir/target", Options: []string{"rbind"}},
			}
		}, "sleep")
		if err == nil {
			_, _ = f.h.Delete(&api.ProcessRef{Id: f.lastID()})
		}
		if entries, _ := os.ReadDir(outside); len(entries) > 0 {
			escaped = i + 1
		}
	}
	stop.Store(true)
	wg.Wait()
	if escaped != 0 {
		entries, _ := os.ReadDir(outside)
		t.Fatalf("attempt %d made %v outside the rootfs, through a symlink swapped into a shared volume", escaped, entries)
	}
	if m := hostMounts(t, outside); m != "" {
		t.Fatalf("mounts outside the rootfs:\n%s", m)
	}
}
