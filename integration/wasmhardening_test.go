//go:build e2e

package integration

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/integration/images"
	"github.com/kuasar-io/containerd-kuasar/plugins/wasm"
)

// TestWasmImageNames: the kubelet names a container's image by its ID and
// passes the name the user wrote (short, tagged, by digest) beside it; a
// Wasm-layer image runs whichever way it was written.
func TestWasmImageNames(t *testing.T) {
	d, pod, podCfg := wasmPod(t, "wasm-names")
	st, err := d.IS.ImageStatus(ctx(t), &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: images.WasmLayer}})
	must(t, err, "ImageStatus")
	if st.Image == nil || len(st.Image.RepoDigests) == 0 {
		t.Fatalf("image status of %s: %v", images.WasmLayer, st.Image)
	}
	id := st.Image.Id
	_, repoDigest, _ := strings.Cut(st.Image.RepoDigests[0], "@")
	for i, name := range []string{
		"wasm-app:layer",
		"library/wasm-app:layer",
		"docker.io/library/wasm-app:layer",
		"wasm-app@" + repoDigest,
		"wasm-app:layer@" + repoDigest,
	} {
		t.Run(name, func(t *testing.T) {
			cfg := wasmConfig(fmt.Sprintf("name%d", i), images.WasmLayer, "echo", "ran as", name)
			cfg.Image = &runtimeapi.ImageSpec{Image: id, UserSpecifiedImage: name}
			c := d.run(t, pod, podCfg, cfg)
			st, log := d.finished(t, c)
			if st.ExitCode != 0 || !strings.Contains(log, "ran as "+name) {
				t.Errorf("image named %q: exit %d\n%s", name, st.ExitCode, log)
			}
			d.stopRemove(t, c, 0)
		})
	}
	d.removePod(t, pod)
}

// TestWasmLargeEnvironment: a container with 50,000 environment variables
// starts as any other (it used to time out: the environment is now built once, in linear time).
func TestWasmLargeEnvironment(t *testing.T) {
	d, pod, podCfg := wasmPod(t, "wasm-env")
	const n = 50000
	cfg := wasmConfig("env", images.WasmLayer, "env")
	for i := 0; i < n; i++ {
		cfg.Envs = append(cfg.Envs, &runtimeapi.KeyValue{Key: fmt.Sprintf("VARIABLE_%05d", i), Value: []byte("value-" + strconv.Itoa(i))})
	}
	begin := time.Now()
	c := d.run(t, pod, podCfg, cfg)
	t.Logf("created and started with %d variables in %v", n, time.Since(begin))
	st, log := d.finished(t, c)
	if got := strings.Count(log, "VARIABLE_"); st.ExitCode != 0 || got != n || !strings.Contains(log, "VARIABLE_49999=value-49999") {
		t.Errorf("exit %d, %d variables seen, want %d", st.ExitCode, got, n)
	}
	d.stopRemove(t, c, 0)
	d.removePod(t, pod)
}

// TestWasmPrivilegedPort: a module's listening sockets are bound with its
// container's credentials: a non-root container on the node's network may
// not listen below 1024; a root one may.
func TestWasmPrivilegedPort(t *testing.T) {
	d := startDaemon(t, daemonOptions{})
	d.pull(t, images.WasmLayer)
	podCfg := d.podConfig("wasm-port")
	podCfg.Linux.SecurityContext.NamespaceOptions.Network = runtimeapi.NamespaceMode_NODE
	pod := d.runPod(t, kuasarWasm, podCfg)
	const addr = "127.0.0.1:1013"

	user := wasmConfig("user", images.WasmLayer, "serve")
	user.Annotations = map[string]string{wasm.ListenAnnotation: addr}
	user.Linux.SecurityContext = &runtimeapi.LinuxContainerSecurityContext{RunAsUser: &runtimeapi.Int64Value{Value: 1000}}
	c := d.create(t, pod, podCfg, user)
	_, err := d.RS.StartContainer(ctx(t), &runtimeapi.StartContainerRequest{ContainerId: c})
	expectErr(t, err, "permission denied")
	_, err = d.RS.RemoveContainer(ctx(t), &runtimeapi.RemoveContainerRequest{ContainerId: c})
	must(t, err, "removing the container that could not listen")

	root := wasmConfig("root", images.WasmLayer, "serve")
	root.Annotations = map[string]string{wasm.ListenAnnotation: addr}
	r := d.run(t, pod, podCfg, root)
	d.waitLog(t, r, "serving on", 10*time.Second)
	must(t, waitPort(addr, 10*time.Second), "the root module's port")
	d.stopRemove(t, r, 0)
	d.removePod(t, pod)
}

// TestWasmHostOOMScore: the Wasm host takes the oom_score_adj configured
// for it, not the daemon's.
func TestWasmHostOOMScore(t *testing.T) {
	d := startDaemon(t, daemonOptions{extraConfig: `
[plugins.'io.containerd.sandbox.controller.v1.kuasar-wasm']
  host_oom_score_adj = 500`})
	d.pull(t, images.WasmLayer)
	cfg := d.podConfig("wasm-oom-score")
	pod := d.runPod(t, kuasarWasm, cfg)
	c := d.run(t, pod, cfg, wasmConfig("sleep", images.WasmLayer, "sleep"))
	d.waitLog(t, c, "sleeping", 10*time.Second)
	hc := d.wasmHostClient()
	h, err := hc.Connect(ctx(t))
	hc.Close()
	must(t, err, "reaching the wasm host")
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/oom_score_adj", h.GetPid()))
	must(t, err, "reading the host's oom_score_adj")
	daemon, _ := os.ReadFile(fmt.Sprintf("/proc/%d/oom_score_adj", d.cmd.Process.Pid))
	if got := strings.TrimSpace(string(b)); got != "500" {
		t.Errorf("the wasm host's oom_score_adj is %s (the daemon's %s), want 500", got, strings.TrimSpace(string(daemon)))
	}
	d.removePod(t, pod)
}
