// Package wasm is the kuasar-wasm sandbox kind: pods whose containers are
// WebAssembly (WASI preview 1) modules from OCI images, run by the node's
// Wasm host (kuasar-wasm-host, see package wasmhost) on wazero.
//
// A pod has the network namespace CRI made for it and no process of its
// own; each container is a module instance in the host, isolated on a
// thread with its own mount namespace (the image's rootfs and the CRI
// mounts), the pod's network namespace and its CPU cgroup, under the
// container's and the pod's memory limits. The module comes from a Wasm
// layer of the image (application/vnd.wasm.content.layer.v1+wasm and
// kin), or is the .wasm file the container's command names in an ordinary
// image's rootfs.
package wasm

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	ctrs "github.com/containerd/containerd/v2/core/containers"
	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/metadata"
	"github.com/containerd/containerd/v2/plugins"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/plugin"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/launch"
	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost"
)

// ID of the controller and of its default CRI runtime handler.
const ID = "kuasar-wasm"

// Config of the kuasar-wasm controller.
type Config struct {
	// HostPath is the kuasar-wasm-host binary: a path, or "" for the one
	// beside containerd-kuasar, else on PATH.
	HostPath string `toml:"host_path" comment:"kuasar-wasm-host binary: a path, or \"\" for the one beside containerd-kuasar, else on PATH"`
	// CacheDir keeps compiled modules across restarts of the host; "" is
	// a folder under the plugin's root directory, "none" disables it.
	CacheDir string `toml:"cache_dir" comment:"Compiled modules kept across restarts of the Wasm host: a directory, \"\" for one under the plugin's root directory, \"none\" for none"`
	// KeepModules is how many compiled modules that no container uses the
	// host keeps in memory, so that the next pod of the same image starts
	// without loading them again.
	KeepModules int `toml:"keep_modules" comment:"Compiled modules that no container uses kept in memory, so that the next pod of the same image starts without loading them"`
	// HostIdleTimeout is how long the host runs without containers
	// before it exits ("0s": never).
	HostIdleTimeout string `toml:"host_idle_timeout" comment:"How long the Wasm host runs without containers before it exits (a Go duration; \"0s\": never)"`
	// HostOOMScoreAdj is the host's oom_score_adj (-1000 to 1000), which
	// it sets itself rather than keep the daemon's (a node's containerd
	// runs at -999: the kernel would kill it last, and with it every Wasm
	// container of the node).
	HostOOMScoreAdj int `toml:"host_oom_score_adj" comment:"The Wasm host's own oom_score_adj (-1000 to 1000), rather than the daemon's (-999 under the shipped unit)"`
}

func init() {
	sandbox.Register(ID, &Config{KeepModules: 16, HostIdleTimeout: "5m"}, newKind, plugins.MetadataPlugin)
}

type kind struct {
	cfg         Config
	env         sandbox.Env
	host        *wasmhost.Client
	images      images.Store
	records     ctrs.Store // containerd's containers, for the image CRI resolved
	content     content.Store
	contentRoot string // the local content store's blobs, when it is local
	blobDir     string // copies of blobs of a content store that is not
}

func newKind(ic *plugin.InitContext, env sandbox.Env) (sandbox.Kind, error) {
	cfg := *ic.Config.(*Config)
	m, err := ic.GetSingle(plugins.MetadataPlugin)
	if err != nil {
		return nil, err
	}
	db := m.(*metadata.DB)
	idle, err := time.ParseDuration(cfg.HostIdleTimeout)
	if err != nil {
		return nil, fmt.Errorf("host_idle_timeout %q: %w", cfg.HostIdleTimeout, err)
	}
	cacheDir := cfg.CacheDir
	switch cacheDir {
	case "":
		cacheDir = filepath.Join(env.Root, "compiled")
	case "none":
		cacheDir = ""
	}
	if cfg.HostOOMScoreAdj < -1000 || cfg.HostOOMScoreAdj > 1000 {
		return nil, fmt.Errorf("host_oom_score_adj %d is not within -1000 and 1000", cfg.HostOOMScoreAdj)
	}
	if _, err := findHost(cfg.HostPath); err != nil {
		log.G(ic.Context).WithError(err).Warn("kuasar-wasm pods will fail until kuasar-wasm-host is installed")
	}
	args := []string{"--idle", idle.String(), "--keep-modules", fmt.Sprint(cfg.KeepModules), "--log-level", log.GetLevel().String(),
		"--oom-score-adj", fmt.Sprint(cfg.HostOOMScoreAdj)}
	if cacheDir != "" {
		args = append(args, "--cache-dir", cacheDir)
	}
	containerdRoot := filepath.Dir(env.Root)
	k := &kind{
		cfg: cfg,
		env: env,
		host: wasmhost.NewClient(wasmhost.Launch{
			Find:    func() (string, error) { return findHost(cfg.HostPath) },
			Socket:  filepath.Join(env.State, "host.sock"),
			LogPath: filepath.Join(env.State, "host.log"),
			Args:    args,
		}),
		images:      metadata.NewImageStore(db),
		records:     metadata.NewContainerStore(db),
		content:     db.ContentStore(),
		contentRoot: filepath.Join(containerdRoot, plugins.ContentPlugin.String()+".content", "blobs"),
		blobDir:     filepath.Join(env.Root, "blobs"),
	}
	k.addMetrics(env.Metrics)
	return k, nil
}

// findHost resolves the host binary: an explicit path, else one beside the
// running executable, else one on PATH.
func findHost(configured string) (string, error) {
	p, err := launch.Find(configured, "kuasar-wasm-host")
	if err != nil {
		return "", fmt.Errorf("%w (set host_path under [plugins.'io.containerd.sandbox.controller.v1.%s'])", err, ID)
	}
	return p, nil
}

// Create builds a pod.
func (k *kind) Create(ctx context.Context, sb *sandbox.Sandbox) (sandbox.Instance, error) {
	// Say it now, on the pod, rather than on its first container.
	if k.host.Boot() == "" {
		if _, err := findHost(k.cfg.HostPath); err != nil {
			return nil, fmt.Errorf("%w: %w", err, errdefs.ErrFailedPrecondition)
		}
	}
	p := &pod{k: k, sb: sb, containers: map[string]string{}}
	if err := p.create(ctx); err != nil {
		return nil, err
	}
	return p, nil
}

// Recover rebuilds a pod from its record; its containers re-attach to the
// host one by one.
func (k *kind) Recover(_ context.Context, sb *sandbox.Sandbox) (sandbox.Instance, error) {
	return &pod{k: k, sb: sb, containers: map[string]string{}}, nil
}
