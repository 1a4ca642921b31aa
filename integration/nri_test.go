//go:build e2e

package integration

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/nri/pkg/api"
	"github.com/containerd/nri/pkg/stub"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/integration/images"
)

// nriPlugin is a real NRI plugin (containerd's nri stub): it records what
// the runtime tells it and adjusts every container it is asked to create.
type nriPlugin struct {
	mu      sync.Mutex
	synced  chan struct{}
	pods    map[string]*api.PodSandbox
	ctrs    map[string]*api.Container
	created []string
}

const nriEnv = "NRI_ADJUSTED"

func (p *nriPlugin) Synchronize(_ context.Context, pods []*api.PodSandbox, ctrs []*api.Container) ([]*api.ContainerUpdate, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, pod := range pods {
		p.pods[pod.GetId()] = pod
	}
	for _, c := range ctrs {
		p.ctrs[c.GetId()] = c
	}
	close(p.synced)
	return nil, nil
}

func (p *nriPlugin) RunPodSandbox(_ context.Context, pod *api.PodSandbox) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.pods[pod.GetId()] = pod
	return nil
}

func (p *nriPlugin) CreateContainer(_ context.Context, pod *api.PodSandbox, c *api.Container) (*api.ContainerAdjustment, []*api.ContainerUpdate, error) {
	p.mu.Lock()
	p.created = append(p.created, pod.GetRuntimeHandler())
	p.mu.Unlock()
	adj := &api.ContainerAdjustment{}
	adj.AddEnv(nriEnv, "by-"+pod.GetRuntimeHandler())
	adj.AddAnnotation("nri.kuasar.io/seen", "yes")
	return adj, nil, nil
}

func startNRIPlugin(t *testing.T, d *Daemon) *nriPlugin {
	t.Helper()
	p := &nriPlugin{synced: make(chan struct{}), pods: map[string]*api.PodSandbox{}, ctrs: map[string]*api.Container{}}
	s, err := stub.New(p, stub.WithPluginName("kuasar-e2e"), stub.WithPluginIdx("10"),
		stub.WithSocketPath(filepath.Join(d.Dir, "nri", "nri.sock")))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := s.Start(ctx); err != nil {
		cancel()
		t.Fatalf("starting the NRI plugin: %v", err)
	}
	t.Cleanup(func() {
		s.Stop()
		cancel()
	})
	select {
	case <-p.synced:
	case <-time.After(20 * time.Second):
		t.Fatal("NRI plugin not synchronized")
	}
	return p
}

// TestNRI: with NRI enabled (containerd 2.x's default), a real NRI plugin
// sees kuasar-runc and kuasar-wasm pods with their namespaces and
// containers with their pids, as it sees stock ones, and can adjust their
// containers; the daemon logs no failure to read their sandbox spec.
func TestNRI(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	type podOf struct {
		handler, id string
		cfg         *runtimeapi.PodSandboxConfig
		ctr         string
	}
	var pods []*podOf
	d.pull(t, images.WasmLayer)
	for _, h := range []string{kuasarRunc, stockRunc, kuasarWasm} {
		p := &podOf{handler: h, cfg: d.podConfig("nri-" + strings.ReplaceAll(h, "-", ""))}
		p.id = d.runPod(t, h, p.cfg)
		cfg := ctrConfig("before", "sleep", "3600")
		if h == kuasarWasm {
			cfg = wasmConfig("before", images.WasmLayer, "sleep", "3600")
		}
		p.ctr = d.run(t, p.id, p.cfg, cfg)
		pods = append(pods, p)
	}
	plugin := startNRIPlugin(t, d)

	plugin.mu.Lock()
	for _, p := range pods {
		pod, ok := plugin.pods[p.id]
		if !ok {
			t.Errorf("%s pod not synchronized to the NRI plugin", p.handler)
			continue
		}
		if pod.GetRuntimeHandler() != p.handler || pod.GetAnnotations()["io.kubernetes.cri.sandbox-id"] != p.id {
			t.Errorf("%s pod as NRI sees it: handler %q, annotations %v", p.handler, pod.GetRuntimeHandler(), pod.GetAnnotations())
		}
		netns := ""
		for _, ns := range pod.GetLinux().GetNamespaces() {
			if ns.GetType() == "network" {
				netns = ns.GetPath()
			}
		}
		if netns == "" {
			t.Errorf("%s pod has no network namespace for NRI: %v", p.handler, pod.GetLinux().GetNamespaces())
		}
		if c, ok := plugin.ctrs[p.ctr]; !ok || c.GetPid() == 0 || c.GetPodSandboxId() != p.id {
			t.Errorf("%s container as NRI sees it: %v", p.handler, c)
		}
	}
	plugin.mu.Unlock()

	// The plugin adjusts new containers of every handler alike.
	for _, p := range pods {
		if p.handler == kuasarWasm {
			c := d.run(t, p.id, p.cfg, wasmConfig("adjusted", images.WasmLayer, "env"))
			if st, log := d.finished(t, c); st.ExitCode != 0 || !strings.Contains(log, nriEnv+"=by-"+p.handler) {
				t.Errorf("%s: NRI's adjustment not applied (exit %d):\n%s", p.handler, st.ExitCode, log)
			}
			continue
		}
		c := d.run(t, p.id, p.cfg, ctrConfig("adjusted", "sleep", "3600"))
		out, _, code := d.execSync(t, c, "sh", "-c", "echo $"+nriEnv)
		if code != 0 || out != "by-"+p.handler+"\n" {
			t.Errorf("%s: NRI's adjustment not applied: %q (exit %d)", p.handler, out, code)
		}
	}
	plugin.mu.Lock()
	if len(plugin.created) != 3 {
		t.Errorf("NRI CreateContainer calls: %v", plugin.created)
	}
	plugin.mu.Unlock()

	log, _ := os.ReadFile(filepath.Join(d.Dir, "daemon.log"))
	if strings.Contains(string(log), "failed to unmarshal sandbox spec") {
		t.Error("the daemon cannot read the sandbox spec of a pod for NRI")
	}
}
