package appkernel

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/plugin"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/launch"
	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
)

// ID of the controller.
const ID = "kuasar-appkernel"

// Handler is its default CRI runtime handler.
const Handler = "kuasar-gvisor"

// configSection names the controller's configuration, for error messages.
const configSection = "[plugins.'io.containerd.sandbox.controller.v1." + ID + "']"

// Platforms runsc can run the sentry on.
const (
	PlatformSystrap = "systrap"
	PlatformPtrace  = "ptrace"
	PlatformKVM     = "kvm"
)

// Config of the kuasar-appkernel controller.
type Config struct {
	// RunscPath is the runsc binary; empty looks beside containerd-kuasar,
	// then on PATH.
	RunscPath string `toml:"runsc_path" comment:"The runsc binary, gVisor built static; empty: beside containerd-kuasar, then on PATH"`
	// Platform is how the sentry intercepts the application's system
	// calls: "systrap" (the default; needs nothing of the host), "ptrace",
	// or "kvm" (needs a /dev/kvm with hardware virtualisation).
	Platform string `toml:"platform" comment:"How the sentry intercepts system calls: \"systrap\" (works anywhere), \"ptrace\", or \"kvm\" (needs /dev/kvm with VMX or SVM)"`
	// Root is runsc's state directory; empty is "runsc" in the controller's
	// state directory.
	Root string `toml:"root" comment:"runsc state directory; empty: \"runsc\" in the controller state directory"`
	// RunscFlags are more runsc flags for every sandbox, "name" or
	// "name=value" (for example "net-raw", "overlay2=none").
	RunscFlags []string `toml:"runsc_flags" comment:"More runsc flags for every sandbox, \"name\" or \"name=value\" (e.g. \"net-raw\", \"overlay2=none\")"`
	// SandboxMemoryOverhead is added to the sum of the memory limits of a
	// pod's containers to make the limit of its sandbox, which also holds
	// gVisor's own memory (sentry and gofers), in bytes.
	SandboxMemoryOverhead int64 `toml:"sandbox_memory_overhead" comment:"Bytes added to the sum of container memory limits for the sandbox cgroup (gVisor own memory: sentry and gofers)"`
	// Debug has runsc write debug logs in each sandbox's directory.
	Debug bool `toml:"debug" comment:"runsc debug logs in each sandbox directory"`
}

// DefaultSandboxMemoryOverhead is what gVisor's own processes of a pod
// need, about: the sentry and one gofer per container.
const DefaultSandboxMemoryOverhead = 64 << 20

func init() {
	sandbox.Register(ID, &Config{
		Platform:              PlatformSystrap,
		SandboxMemoryOverhead: DefaultSandboxMemoryOverhead,
	}, func(ic *plugin.InitContext, env sandbox.Env) (sandbox.Kind, error) {
		cfg := *ic.Config.(*Config)
		k, err := newKind(cfg, env)
		if err != nil {
			return nil, err
		}
		if _, err := k.runscBinary(); err != nil {
			log.G(ic.Context).WithError(err).Warn("kuasar-gvisor pods will fail until runsc is installed")
		}
		if err := k.checkPlatform(); err != nil {
			log.G(ic.Context).WithError(err).Warn("kuasar-gvisor pods will fail until the platform is fixed")
		}
		return k, nil
	})
}

type kind struct {
	cfg  Config
	env  sandbox.Env
	root string // runsc's state directory
	// idle is the root container's program, shared by every pod.
	idle string
	// kvmUsable reports why KVM cannot be used (nil: it can).
	kvmUsable func() error
}

func newKind(cfg Config, env sandbox.Env) (*kind, error) {
	k := &kind{cfg: cfg, env: env, root: cfg.Root, kvmUsable: hypervisor.KVMUsable}
	if k.root == "" {
		k.root = filepath.Join(env.State, "runsc")
	}
	if err := os.MkdirAll(k.root, 0o711); err != nil {
		return nil, err
	}
	prog, err := idleForHost()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", err, plugin.ErrSkipPlugin)
	}
	k.idle = filepath.Join(env.Root, "idle")
	if err := writeIfChanged(k.idle, prog, 0o555); err != nil {
		return nil, fmt.Errorf("writing the root container program: %w", err)
	}
	return k, nil
}

// writeIfChanged writes a file unless it already has that content.
func writeIfChanged(path string, b []byte, mode os.FileMode) error {
	if old, err := os.ReadFile(path); err == nil && string(old) == string(b) {
		return nil
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// runscBinary resolves runsc at each use, so that installing it later
// needs no daemon restart.
func (k *kind) runscBinary() (string, error) {
	path, err := launch.Find(k.cfg.RunscPath, "runsc")
	if err != nil {
		return "", fmt.Errorf("runsc not found (%v): install gVisor's runsc beside containerd-kuasar or on PATH, or set runsc_path under %s: %w",
			err, configSection, errdefs.ErrFailedPrecondition)
	}
	return path, nil
}

// checkPlatform reports a platform this node cannot run.
func (k *kind) checkPlatform() error {
	switch k.platform() {
	case PlatformSystrap, PlatformPtrace:
		return nil
	case PlatformKVM:
		if err := k.kvmUsable(); err != nil {
			return fmt.Errorf("platform = %q but KVM is not usable here (%v): set platform = %q or %q under %s: %w",
				PlatformKVM, err, PlatformSystrap, PlatformPtrace, configSection, errdefs.ErrFailedPrecondition)
		}
		return nil
	}
	return fmt.Errorf("platform = %q: want %q, %q or %q (under %s): %w",
		k.cfg.Platform, PlatformSystrap, PlatformPtrace, PlatformKVM, configSection, errdefs.ErrInvalidArgument)
}

func (k *kind) platform() string {
	p := strings.ToLower(strings.TrimSpace(k.cfg.Platform))
	if p == "" {
		return PlatformSystrap
	}
	return p
}

// globalFlags are the runsc flags of a sandbox.
func (k *kind) globalFlags(sb *sandbox.Sandbox, logPath string) []string {
	network := "sandbox"
	if sb.HostNetwork() {
		network = "host"
	}
	flags := []string{
		"--root=" + k.root,
		"--platform=" + k.platform(),
		"--network=" + network,
		"--log=" + logPath,
		"--log-format=json",
	}
	if k.cfg.Debug {
		flags = append(flags, "--debug", "--debug-log="+filepath.Join(sb.Dir, "debug")+"/")
	}
	for _, f := range k.cfg.RunscFlags {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		if !strings.HasPrefix(f, "-") {
			f = "--" + f
		}
		flags = append(flags, f)
	}
	return flags
}

// Create builds a pod's sandbox: gVisor's sentry with the root container.
func (k *kind) Create(ctx context.Context, sb *sandbox.Sandbox) (sandbox.Instance, error) {
	bin, err := k.runscBinary()
	if err != nil {
		return nil, err
	}
	if err := k.checkPlatform(); err != nil {
		return nil, err
	}
	p := newPod(k, sb, bin)
	if err := p.create(ctx); err != nil {
		return nil, err
	}
	return p, nil
}

// Recover rebuilds a pod from its record.
func (k *kind) Recover(ctx context.Context, sb *sandbox.Sandbox) (sandbox.Instance, error) {
	var st podState
	if err := json.Unmarshal(sb.State, &st); err != nil {
		return nil, fmt.Errorf("decoding pod state: %w", err)
	}
	bin, err := k.runscBinary()
	if err != nil {
		// Not fatal: the sandbox runs; commands fail until runsc is back.
		log.G(ctx).WithError(err).WithField("sandbox", sb.ID).Warn("recovering a kuasar-gvisor pod without runsc")
		bin = st.Runsc
	}
	p := newPod(k, sb, bin)
	p.st = st
	p.cli.flags = st.Flags
	if err := p.recover(ctx); err != nil {
		return nil, err
	}
	return p, nil
}
