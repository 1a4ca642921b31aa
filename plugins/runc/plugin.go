// Package runc is the kuasar-runc sandbox kind: pods isolated by Linux
// namespaces and cgroups, their containers run by runc, with no pause
// container and no shim process. The pod's network namespace is the one CRI
// made; its IPC and UTS namespaces are pinned to files; a shared PID
// namespace gets a tiny init. Container processes are children of the
// node's process keeper, so they outlive a daemon restart with their exit
// statuses intact.
package runc

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/plugin"

	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
)

// ID of the controller and of its default CRI runtime handler.
const ID = "kuasar-runc"

// Config of the kuasar-runc controller.
type Config struct {
	// Runtime is the OCI runtime binary: a path, or a name looked up on
	// PATH.
	Runtime string `toml:"runtime" comment:"OCI runtime binary: a path, or a name looked up on PATH (at each use: installing it needs no restart)"`
	// EnableUnprivilegedPorts and EnableUnprivilegedICMP give every pod
	// with its own network the sysctls stock CRI gives it.
	EnableUnprivilegedPorts bool `toml:"enable_unprivileged_ports" comment:"Give every pod with a network of its own net.ipv4.ip_unprivileged_port_start=0, as stock CRI does"`
	EnableUnprivilegedICMP  bool `toml:"enable_unprivileged_icmp" comment:"Give every pod with a network of its own net.ipv4.ping_group_range=\"0 2147483647\", as stock CRI does"`
}

func init() {
	sandbox.Register(ID, &Config{
		Runtime:                 "runc",
		EnableUnprivilegedPorts: true,
		EnableUnprivilegedICMP:  true,
	}, func(ic *plugin.InitContext, env sandbox.Env) (sandbox.Kind, error) {
		k := &kind{cfg: *ic.Config.(*Config), env: env, runcRoot: filepath.Join(env.State, "runc")}
		if _, err := k.runc(); err != nil {
			log.G(ic.Context).WithError(err).Warn("kuasar-runc pods will fail until runc is installed")
		}
		return k, nil
	})
}

type kind struct {
	cfg      Config
	env      sandbox.Env
	runcRoot string
}

// runc resolves the runtime binary at each use, so that installing it
// later needs no daemon restart.
func (k *kind) runc() (*runcCLI, error) {
	path, err := exec.LookPath(k.cfg.Runtime)
	if err != nil {
		return nil, fmt.Errorf("OCI runtime %q not found (install runc, or set runtime under [plugins.'io.containerd.sandbox.controller.v1.%s']): %w",
			k.cfg.Runtime, ID, errdefs.ErrFailedPrecondition)
	}
	return &runcCLI{path: path, root: k.runcRoot}, nil
}

// Create builds a pod.
func (k *kind) Create(ctx context.Context, sb *sandbox.Sandbox) (sandbox.Instance, error) {
	if _, err := k.runc(); err != nil {
		return nil, err
	}
	p := &pod{k: k, sb: sb}
	if err := p.create(ctx); err != nil {
		return nil, err
	}
	return p, nil
}

// Recover rebuilds a pod from its record.
func (k *kind) Recover(ctx context.Context, sb *sandbox.Sandbox) (sandbox.Instance, error) {
	p := &pod{k: k, sb: sb}
	if len(sb.State) > 0 {
		if err := json.Unmarshal(sb.State, &p.st); err != nil {
			return nil, fmt.Errorf("decoding pod state: %w", err)
		}
	}
	if p.st.HolderPid != 0 {
		if err := p.k.env.Monitor.Rewatch(ctx, p.holderRef(), p.holderExited(p.holderRef())); err != nil {
			return nil, err
		}
	}
	return p, nil
}
