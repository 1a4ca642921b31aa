// Package vmm is the kuasar-vmm sandbox kind: each pod runs in a microVM of
// its own (QEMU, with KVM where the node has it and software emulation
// where it does not), whose guest agent (cmd/kuasar-vmm-agent) runs the
// pod's containers with runc inside the guest. containerd-kuasar serves
// their task API itself, as for every kind, and forwards each call to the
// agent over the VM's channel (plugins/vmm/channel): there is no shim, no
// pause container and no other per-pod process than the hypervisor.
//
// The hypervisor is a child of the node's process keeper, not of the daemon,
// and sits in the pod's cgroup; VMs outlive a daemon restart and are taken
// back from their records. Each container's rootfs and CRI mounts reach the
// guest through the pod's share (9p); the pod's network is the CNI
// interface of its network namespace, joined to a tap the VM's NIC uses.
// With templates on, a pod's VM is a clone of a VM booted once per guest
// image and size (see template.go) rather than a kernel boot.
package vmm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/plugin"

	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/qemu"
)

// ID of the controller and of its default CRI runtime handler.
const ID = "kuasar-vmm"

// Config of the kuasar-vmm controller.
type Config struct {
	// Hypervisor is the VMM driver: "qemu".
	Hypervisor string `toml:"hypervisor" comment:"The VMM driver: \"qemu\""`
	// HypervisorPath is the VMM binary: a path, or a name on PATH (""
	// for qemu-system-x86_64).
	HypervisorPath string `toml:"hypervisor_path" comment:"The VMM binary: a path, or a name on PATH (empty: qemu-system-x86_64)"`
	// KernelPath and InitrdPath are the guest image (`make guest`); empty
	// looks in ImageDir.
	KernelPath string `toml:"kernel_path" comment:"The guest kernel (vmlinux of make guest); empty: the one in image_dir"`
	InitrdPath string `toml:"initrd_path" comment:"The guest initramfs (make guest); empty: the one in image_dir"`
	// ImageDir holds a guest image (vmlinux, initramfs.cpio, guest.json);
	// empty looks beside the daemon (../share/kuasar/guest) and in
	// /usr/share/kuasar/guest and /usr/local/share/kuasar/guest.
	ImageDir string `toml:"image_dir" comment:"A guest image directory (vmlinux, initramfs.cpio, guest.json); empty: ../share/kuasar/guest beside the daemon, then /usr/share and /usr/local/share/kuasar/guest"`
	// Accel is "auto" (KVM where it is usable, else TCG), "kvm" or "tcg".
	Accel string `toml:"accel" comment:"\"auto\" (KVM where usable, else TCG), \"kvm\" (refuse pods without KVM) or \"tcg\" (software emulation)"`
	// DefaultVCPUs and DefaultMemoryMiB size a VM whose pod says nothing
	// of its resources (and are the least a VM gets); a pod's memory
	// limit gets OverheadMemoryMiB more, for the guest's kernel and
	// agent; MaxVCPUs and MaxMemoryMiB bound what a pod may ask for.
	DefaultVCPUs      int `toml:"default_vcpus" comment:"vCPUs of a VM whose pod sets no CPU limit, and the least a VM gets"`
	DefaultMemoryMiB  int `toml:"default_memory_mib" comment:"Memory (MiB) of a VM whose pod sets no memory limit, and the least a VM gets"`
	OverheadMemoryMiB int `toml:"overhead_memory_mib" comment:"MiB added to a pod memory limit for the guest kernel and agent"`
	MaxVCPUs          int `toml:"max_vcpus" comment:"The most vCPUs a pod may ask for (more is InvalidArgument)"`
	MaxMemoryMiB      int `toml:"max_memory_mib" comment:"The most memory (MiB) a pod VM may get (more is InvalidArgument)"`
	// TBSizeMiB is TCG's translation cache per VM (its default, 1 GiB,
	// costs memory as it fills). At 32 runc's init thrashes it (a
	// container's create and start take ~3 s under TCG); 64 brings that
	// to ~0.6 s for ~23 MB more per VM.
	TBSizeMiB int `toml:"tb_size_mib" comment:"TCG translation cache per VM, MiB (QEMU default 1 GiB; 64 keeps a container start under a second)"`
	// BootTimeout bounds the wait for a VM's agent.
	BootTimeout string `toml:"boot_timeout" comment:"How long a VM may take to answer (a Go duration); past it the pod fails with DeadlineExceeded"`
	// Template is "auto" (start pod VMs as clones of a VM booted once per
	// guest image and size) or "off" (boot each one).
	Template string `toml:"template" comment:"\"auto\": pod VMs are clones of a VM booted once per guest image and size; \"off\": every pod VM boots"`
	// TemplateScope is which pods share a template: "namespace" (the
	// pods of one Kubernetes namespace: a QEMU taken over can reach the
	// RAM of its template's other clones, so the boundary is a tenant's)
	// or "node" (every pod: one template per image and size).
	TemplateScope string `toml:"template_scope" comment:"Which pods share a VM template: \"namespace\" (those of one namespace: a taken-over QEMU could alter its template's RAM, which its other clones map) or \"node\" (all)"`
	// TemplateDir keeps templates' RAM files (a tmpfs, only this daemon's);
	// empty is a directory of /dev/shm named after the daemon's state.
	TemplateDir string `toml:"template_dir" comment:"Where templates keep their RAM (a tmpfs, root-only); empty: /dev/shm/kuasar-vmm-<hash of the state dir>"`
	// Jail confines each hypervisor (package jail): a root of its own
	// with only the files it uses, the capabilities of its 9p server and
	// no new privileges. Off runs it as root with the daemon's view of
	// the node (a QEMU needing files the jail does not know of).
	Jail bool `toml:"jail" comment:"Confine each hypervisor: a root holding only what it uses, 9p's capabilities only, no new privileges (false: QEMU runs as root with the node's files)"`
}

// DefaultConfig is the controller's default configuration.
func DefaultConfig() *Config {
	return &Config{
		Hypervisor:        qemu.Name,
		Accel:             string(hypervisor.AccelAuto),
		DefaultVCPUs:      1,
		DefaultMemoryMiB:  128,
		OverheadMemoryMiB: 96,
		MaxVCPUs:          8,
		MaxMemoryMiB:      8192,
		TBSizeMiB:         64,
		BootTimeout:       "60s",
		Template:          "auto",
		TemplateScope:     "namespace",
		Jail:              true,
	}
}

func init() {
	sandbox.Register(ID, DefaultConfig(), newKind)
}

type kind struct {
	cfg         Config
	env         sandbox.Env
	bootTimeout time.Duration
	accel       hypervisor.Accel
	accelErr    error // why accel cannot be used (reported on each pod)
	runDirs     string
	templates   *templates
}

func newKind(ic *plugin.InitContext, env sandbox.Env) (sandbox.Kind, error) {
	cfg := *ic.Config.(*Config)
	if cfg.Hypervisor != qemu.Name {
		return nil, fmt.Errorf("hypervisor %q: only %q is supported", cfg.Hypervisor, qemu.Name)
	}
	d, err := time.ParseDuration(cfg.BootTimeout)
	if err != nil || d <= 0 {
		return nil, fmt.Errorf("boot_timeout %q: %v", cfg.BootTimeout, err)
	}
	switch cfg.Template {
	case "auto", "off":
	default:
		return nil, fmt.Errorf("template %q: want \"auto\" or \"off\"", cfg.Template)
	}
	switch cfg.TemplateScope {
	case "namespace", "node":
	default:
		return nil, fmt.Errorf("template_scope %q: want \"namespace\" or \"node\"", cfg.TemplateScope)
	}
	if cfg.DefaultVCPUs < 1 || cfg.DefaultMemoryMiB < 64 || cfg.MaxVCPUs < cfg.DefaultVCPUs || cfg.MaxMemoryMiB < cfg.DefaultMemoryMiB {
		return nil, fmt.Errorf("VM sizes: default %d vCPUs / %d MiB, max %d / %d MiB", cfg.DefaultVCPUs, cfg.DefaultMemoryMiB, cfg.MaxVCPUs, cfg.MaxMemoryMiB)
	}
	k := &kind{cfg: cfg, env: env, bootTimeout: d}
	k.accel, k.accelErr = hypervisor.ResolveAccel(cfg.Accel, hypervisor.KVMUsable())
	// VM run directories hold Unix sockets: short paths under the daemon's
	// state directory.
	k.runDirs = filepath.Join(filepath.Dir(env.State), "v")
	if err := os.MkdirAll(k.runDirs, 0o700); err != nil {
		return nil, err
	}
	tdir := cfg.TemplateDir
	if tdir == "" {
		// A daemon's own: another daemon's clones map their templates'
		// files, which must never be rewritten under them.
		h := sha256.Sum256([]byte(env.State))
		tdir = filepath.Join("/dev/shm", "kuasar-vmm-"+hex.EncodeToString(h[:6]))
	}
	if err := os.MkdirAll(tdir, 0o700); err != nil {
		return nil, fmt.Errorf("template_dir: %w", err)
	}
	if err := privateDir(tdir); err != nil && k.cfg.Template == "auto" {
		// Every clone runs what is in there: never a directory someone
		// else can write, or made first (the default's name is known).
		log.G(ic.Context).WithError(err).Errorf("kuasar-vmm templates are off: every pod VM boots; remove it, or set template_dir under [plugins.'io.containerd.sandbox.controller.v1.%s'] to a directory of root's only", ID)
		k.cfg.Template, tdir = "off", ""
	}
	k.templates = newTemplates(k, filepath.Join(env.State, "templates"), tdir)
	if err := k.check(); err != nil {
		// Not fatal: reported on each pod, found again at each start.
		log.G(ic.Context).WithError(err).Warn("kuasar-vmm pods will fail until this is fixed")
	} else {
		log.G(ic.Context).WithField("accel", k.accel).Info("kuasar-vmm ready")
	}
	return k, nil
}

// check reports what is missing to run a VM, with how to fix it.
func (k *kind) check() error {
	if k.accelErr != nil {
		return k.accelErr
	}
	if _, err := qemu.FindBinary(k.cfg.HypervisorPath); err != nil {
		return fmt.Errorf("%w (hypervisor_path under [plugins.'io.containerd.sandbox.controller.v1.%s'])", err, ID)
	}
	_, err := k.image()
	return err
}

// image finds the guest image, at each use (installing it needs no daemon
// restart).
func (k *kind) image() (*guest.Image, error) {
	if k.cfg.KernelPath != "" || k.cfg.InitrdPath != "" {
		img := &guest.Image{Kernel: k.cfg.KernelPath, Initrd: k.cfg.InitrdPath}
		if dir := filepath.Dir(k.cfg.KernelPath); k.cfg.KernelPath != "" {
			if m, err := guest.Open(dir); err == nil && m.Initrd == k.cfg.InitrdPath {
				return m, nil
			}
		}
		for _, o := range []struct{ what, f string }{{"kernel_path", img.Kernel}, {"initrd_path", img.Initrd}} {
			what, f := o.what, o.f
			if _, err := os.Stat(f); err != nil {
				return nil, fmt.Errorf("guest %s %q: %v (build it with `make guest`, or set it under [plugins.'io.containerd.sandbox.controller.v1.%s']): %w", what, f, err, ID, errdefs.ErrFailedPrecondition)
			}
		}
		return img, nil
	}
	var dirs []string
	if k.cfg.ImageDir != "" {
		dirs = []string{k.cfg.ImageDir}
	} else {
		if self, err := os.Executable(); err == nil {
			dirs = append(dirs, filepath.Join(filepath.Dir(self), "..", "share", "kuasar", "guest"))
		}
		dirs = append(dirs, "/usr/share/kuasar/guest", "/usr/local/share/kuasar/guest")
	}
	var errs []string
	for _, d := range dirs {
		img, err := guest.Open(d)
		if err == nil {
			return img, nil
		}
		errs = append(errs, err.Error())
	}
	return nil, fmt.Errorf("no kuasar-vmm guest image (%v): build it with `make guest` and install it (`make install`), or set image_dir (or kernel_path and initrd_path) under [plugins.'io.containerd.sandbox.controller.v1.%s']: %w", errs, ID, errdefs.ErrFailedPrecondition)
}

// Create builds a pod: its VM is started by Start.
func (k *kind) Create(ctx context.Context, sb *sandbox.Sandbox) (sandbox.Instance, error) {
	if err := k.check(); err != nil {
		return nil, err
	}
	p := &pod{k: k, sb: sb}
	if err := p.create(ctx); err != nil {
		return nil, err
	}
	return p, nil
}

// Recover takes a pod's VM back after a daemon restart.
func (k *kind) Recover(ctx context.Context, sb *sandbox.Sandbox) (sandbox.Instance, error) {
	p := &pod{k: k, sb: sb}
	if len(sb.State) > 0 {
		if err := json.Unmarshal(sb.State, &p.st); err != nil {
			return nil, fmt.Errorf("decoding pod state: %w", err)
		}
	}
	if err := p.recover(ctx); err != nil {
		return nil, err
	}
	return p, nil
}

// privateDir checks that dir is a directory (not a symlink) of the
// daemon's user that no one else may write or enter.
func privateDir(dir string) error {
	st, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	switch {
	case !st.IsDir():
		return fmt.Errorf("template_dir %s is not a directory (%v)", dir, st.Mode().Type())
	case !ok || int(sys.Uid) != os.Geteuid():
		return fmt.Errorf("template_dir %s belongs to uid %d, not to the daemon's", dir, sys.Uid)
	case st.Mode().Perm()&0o077 != 0:
		return fmt.Errorf("template_dir %s has mode %v: others may use it", dir, st.Mode().Perm())
	}
	return nil
}
