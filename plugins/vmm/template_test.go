package vmm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/plugin"

	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
)

// The default template_dir is /dev/shm/kuasar-vmm-<hash of the state
// directory>: a world-writable directory, and a name any local user can
// work out (the state directory is in the daemon's configuration). A user
// who makes that directory first owns it; newKind's MkdirAll takes it as it
// is. QEMU (root) then writes every template's RAM there (mode 0644) and
// every clone maps it: the user reads the template's memory and, owning the
// directory, swaps a RAM file for one of its own, which every later pod VM
// runs (guest kernel code of the user's choice, with the pod's volumes in
// its share). The daemon must refuse (or replace) a template directory it
// does not own, or that others can write or enter.
func TestTemplateDirPrecreatedByAnotherUser(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("skipping: needs root (chown)")
	}
	state := filepath.Join(t.TempDir(), "state")
	h := sha256.Sum256([]byte(state))
	tdir := filepath.Join("/dev/shm", "kuasar-vmm-"+hex.EncodeToString(h[:6]))
	// The attacker, uid 65534, is there first.
	if err := os.Mkdir(tdir, 0o777); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(tdir) })
	if err := os.Chmod(tdir, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(tdir, 65534, 65534); err != nil {
		t.Fatal(err)
	}

	ic := &plugin.InitContext{Context: context.Background(), Config: DefaultConfig()}
	k, err := newKind(ic, sandbox.Env{State: state, Root: filepath.Join(t.TempDir(), "root")})
	if err != nil {
		return // refused: fine
	}
	ramDir := k.(*kind).templates.ramDir
	if ramDir == "" && k.(*kind).cfg.Template == "off" {
		return // templates off: every VM boots, nothing is read from there
	}
	st, err := os.Lstat(ramDir)
	if err != nil {
		t.Fatal(err)
	}
	sys := st.Sys().(*syscall.Stat_t)
	if !st.IsDir() || sys.Uid != 0 || st.Mode().Perm()&0o077 != 0 {
		t.Errorf("templates' RAM go to %s, owned by uid %d, mode %v: another user made it and can read and replace the RAM every clone runs",
			ramDir, sys.Uid, st.Mode())
	}
}

// A template is rebuilt when anything it was booted from changes: the
// image's key (a new agent or kernel package), the kernel or initramfs
// replaced at the same path (an image given by kernel_path and
// initrd_path, with no key), or the VM's shape.
func TestTemplateKeyChanges(t *testing.T) {
	dir := t.TempDir()
	kernel, initrd := filepath.Join(dir, "vmlinux"), filepath.Join(dir, "initramfs.cpio")
	for _, f := range []string{kernel, initrd} {
		if err := os.WriteFile(f, []byte("one"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	img := &guest.Image{Kernel: kernel, Initrd: initrd}
	cfg := hypervisor.Config{VCPUs: 1, MemoryMiB: 128}
	base := templateKey(img, cfg, "")
	if again := templateKey(img, cfg, ""); again != base {
		t.Fatalf("the key of the same inputs changed: %s, %s", base, again)
	}
	replace := func(path string) {
		tmp := path + ".new"
		if err := os.WriteFile(tmp, []byte("two"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[string]string{base: "the original"}
	check := func(what string, key string) {
		t.Helper()
		if prev, ok := seen[key]; ok {
			t.Errorf("%s: same template key as %s", what, prev)
		}
		seen[key] = what
	}
	replace(kernel)
	check("a new kernel at the same path", templateKey(img, cfg, ""))
	replace(initrd)
	check("a new initramfs at the same path", templateKey(img, cfg, ""))
	withKey := *img
	withKey.Key = "agent-v2"
	check("a new image key", templateKey(&withKey, cfg, ""))
	bigger := cfg
	bigger.MemoryMiB = 256
	check("more memory", templateKey(img, bigger, ""))
	check("the pods of a namespace", templateKey(img, cfg, "namespace/team-a"))
	check("the pods of another namespace", templateKey(img, cfg, "namespace/team-b"))
}

// TestPruneKeepsRecentTemplates: a template a pod asked for a moment ago
// is kept by a prune (its clone may not map the RAM file yet); one no pod
// asked for lately, and no VM maps, goes.
func TestPruneKeepsRecentTemplates(t *testing.T) {
	dir, ramDir := t.TempDir(), t.TempDir()
	ts := newTemplates(nil, dir, ramDir)
	for _, key := range []string{"recent", "stale", "new"} {
		tpl := vmTemplate{Key: key, StateFile: filepath.Join(dir, key, "state"), RAMFile: filepath.Join(ramDir, key+".ram")}
		if err := os.MkdirAll(filepath.Join(dir, key), 0o700); err != nil {
			t.Fatal(err)
		}
		b, _ := json.Marshal(tpl)
		for f, data := range map[string][]byte{tpl.StateFile: nil, tpl.RAMFile: nil, filepath.Join(dir, key, "template.json"): b} {
			if err := os.WriteFile(f, data, 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	ts.used["recent"] = time.Now()
	ts.used["stale"] = time.Now().Add(-2 * pruneGrace)
	ts.prune(context.Background(), "new")
	for key, kept := range map[string]bool{"recent": true, "stale": false, "new": true} {
		if _, err := ts.load(key); (err == nil) != kept {
			t.Errorf("template %s: kept %v, want %v", key, err == nil, kept)
		}
	}
}
