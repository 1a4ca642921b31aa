//go:build e2e

package integration

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/contrib/scratch"
	"github.com/kuasar-io/containerd-kuasar/integration/images"
	"github.com/kuasar-io/containerd-kuasar/plugins/metrics/metricstest"
)

// freeLoopbackAddr is a TCP address on loopback nothing listens on now.
func freeLoopbackAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// scrape reads the daemon's metrics endpoint.
func scrape(t *testing.T, addr string) metricstest.Series {
	t.Helper()
	c := http.Client{Timeout: 30 * time.Second}
	resp, err := c.Get("http://" + addr + "/v1/metrics")
	if err != nil {
		t.Fatalf("scraping %s: %v", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scraping %s: %s", addr, resp.Status)
	}
	s, err := metricstest.Parse(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// series of a controller whose handler has its name.
func series(name, handler string, labels ...string) string {
	sandboxer := handler
	if handler == kuasarGVisor {
		sandboxer = "kuasar-appkernel"
	}
	return metricstest.Key(name, append([]string{"sandboxer", sandboxer, "handler", handler}, labels...)...)
}

// metricsCheck compares what a scrape says with what the test expects.
type metricsCheck struct {
	t *testing.T
	s metricstest.Series
}

func (c metricsCheck) is(key string, want float64) {
	c.t.Helper()
	got, ok := c.s[key]
	switch {
	case !ok:
		c.t.Errorf("no series %s", key)
	case got != want:
		c.t.Errorf("%s = %v, want %v", key, got, want)
	}
}

func (c metricsCheck) atLeast(key string, want float64) {
	c.t.Helper()
	got, ok := c.s[key]
	switch {
	case !ok:
		c.t.Errorf("no series %s", key)
	case got < want:
		c.t.Errorf("%s = %v, want at least %v", key, got, want)
	}
}

// TestMetrics: with `[metrics] address` set, containerd's endpoint serves
// the Kuasar metrics next to containerd's own, and they follow what
// happens: pods of each handler counted by state, start latencies and
// failures, the keeper's children, the Wasm host's instances and memory,
// and what recovery found after a restart.
func TestMetrics(t *testing.T) {
	addr := freeLoopbackAddr(t)
	d := startDaemon(t, daemonOptions{extraConfig: fmt.Sprintf("[plugins.'io.containerd.server.v1.metrics']\n  address = %q\n", addr)})
	d.pull(t, images.WasmLayer)
	handlers := []string{kuasarRunc, kuasarWasm, kuasarVMM, kuasarGVisor}
	needQEMU(t)

	before := scrape(t, addr)
	c := metricsCheck{t, before}
	if len(before.Names("containerd_")) == 0 {
		t.Errorf("containerd's own metrics are not served next to ours: %v", before.Names(""))
	}
	for _, h := range handlers {
		if h == kuasarGVisor {
			continue // its handler is not its controller's name: its series come with its first pod
		}
		for _, st := range []string{"created", "ready", "notready"} {
			c.is(series("kuasar_sandboxes", h, "state", st), 0)
		}
	}
	c.is("kuasar_wasm_host_up{sandboxer=\"kuasar-wasm\"}", 0)
	c.is("kuasar_wasm_host_instances{sandboxer=\"kuasar-wasm\"}", 0)
	for _, name := range before.Names("kuasar_") {
		for k := range before {
			if strings.HasPrefix(k, name+"{") && (strings.Contains(k, "sandbox_id") || strings.Contains(k, "container_id")) {
				t.Errorf("a series is labelled with an ID: %s", k)
			}
		}
	}

	type pod struct {
		id  string
		cfg *runtimeapi.PodSandboxConfig
		ctr string
	}
	pods := map[string]*pod{}
	for _, h := range handlers {
		p := &pod{cfg: d.podConfig("metrics-" + strings.ReplaceAll(h, "-", ""))}
		p.id = d.runPod(t, h, p.cfg)
		cfg := ctrConfig("sleeper", "sleep", "3600")
		if h == kuasarWasm {
			cfg = wasmConfig("sleeper", images.WasmLayer, "sleep", "3600")
		}
		p.ctr = d.run(t, p.id, p.cfg, cfg)
		pods[h] = p
	}
	// A container whose command does not exist fails to start.
	bad := d.create(t, pods[kuasarRunc].id, pods[kuasarRunc].cfg, ctrConfig("bad", "/no/such/command"))
	if _, err := d.RS.StartContainer(ctx(t), &runtimeapi.StartContainerRequest{ContainerId: bad}); err == nil {
		t.Fatal("a container without its command started")
	}
	if _, err := d.RS.RemoveContainer(ctx(t), &runtimeapi.RemoveContainerRequest{ContainerId: bad}); err != nil {
		t.Fatal(err)
	}

	// A module instance counts once its thread runs it.
	var running metricstest.Series
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		running = scrape(t, addr)
		if running[`kuasar_wasm_host_instances{sandboxer="kuasar-wasm"}`] >= 1 || time.Now().After(deadline) {
			break
		}
	}
	c = metricsCheck{t, running}
	var lines []string
	for k, v := range running {
		if strings.HasPrefix(k, "kuasar_") {
			lines = append(lines, fmt.Sprintf("%s %v", k, v))
		}
	}
	sort.Strings(lines)
	t.Logf("Kuasar series with a pod of each handler running:\n%s", strings.Join(lines, "\n"))
	for _, h := range handlers {
		c.is(series("kuasar_sandboxes", h, "state", "ready"), 1)
		c.is(series("kuasar_sandboxes", h, "state", "created"), 0)
		c.is(series("kuasar_sandbox_start_duration_seconds_count", h), before[series("kuasar_sandbox_start_duration_seconds_count", h)]+1)
		c.is(series("kuasar_container_start_duration_seconds_count", h), before[series("kuasar_container_start_duration_seconds_count", h)]+1)
		if running[series("kuasar_sandbox_start_duration_seconds_sum", h)] <= 0 || running[series("kuasar_container_start_duration_seconds_sum", h)] <= 0 {
			t.Errorf("%s: start durations are not recorded", h)
		}
	}
	c.is(series("kuasar_container_start_failures_total", kuasarRunc), 1)
	boots := 0.0
	for k, v := range running {
		if strings.HasPrefix(k, "kuasar_vm_boot_duration_seconds_count{") && strings.Contains(k, `handler="kuasar-vmm"`) && strings.Contains(k, `accel="tcg"`) {
			boots += v
		}
	}
	if boots != 1 {
		t.Errorf("VM boots recorded: %v, want 1", boots)
	}
	c.is("kuasar_keeper_up{}", 1)
	c.atLeast("kuasar_keeper_children{}", 1)
	c.atLeast("kuasar_keeper_watched_processes{}", 1)
	c.is(`kuasar_wasm_host_up{sandboxer="kuasar-wasm"}`, 1)
	c.is(`kuasar_wasm_host_instances{sandboxer="kuasar-wasm"}`, 1)
	c.atLeast(`kuasar_wasm_host_compiled_modules{sandboxer="kuasar-wasm"}`, 1)
	c.atLeast(`kuasar_wasm_host_linear_memory_bytes{sandboxer="kuasar-wasm"}`, 1)
	if lin, res := running[`kuasar_wasm_host_linear_memory_bytes{sandboxer="kuasar-wasm"}`], running[`kuasar_wasm_host_resident_memory_bytes{sandboxer="kuasar-wasm"}`]; res <= lin {
		t.Errorf("Wasm host resident memory %v, linear memory %v", res, lin)
	}

	// A restart: the new daemon counts what it took back.
	d.restart(syscall.SIGKILL)
	after := scrape(t, addr)
	c = metricsCheck{t, after}
	for _, h := range handlers {
		c.is(series("kuasar_sandbox_recoveries_total", h, "result", "recovered"), 1)
		c.is(series("kuasar_container_recoveries_total", h, "result", "recovered"), 1)
		c.is(series("kuasar_sandboxes", h, "state", "ready"), 1)
		if _, ok := after[series("kuasar_sandbox_recoveries_total", h, "result", "lost")]; ok {
			t.Errorf("%s: a sandbox was lost at the restart", h)
		}
	}
	c.is("kuasar_keeper_up{}", 1)
	c.atLeast("kuasar_keeper_children{}", 1)

	// Stopped, then removed: the gauges come down to 0.
	for _, h := range handlers {
		if _, err := d.RS.StopPodSandbox(ctx(t), &runtimeapi.StopPodSandboxRequest{PodSandboxId: pods[h].id}); err != nil {
			t.Fatal(err)
		}
	}
	c = metricsCheck{t, scrape(t, addr)}
	for _, h := range handlers {
		c.is(series("kuasar_sandboxes", h, "state", "ready"), 0)
		c.is(series("kuasar_sandboxes", h, "state", "notready"), 1)
	}
	for _, h := range handlers {
		if _, err := d.RS.RemovePodSandbox(ctx(t), &runtimeapi.RemovePodSandboxRequest{PodSandboxId: pods[h].id}); err != nil {
			t.Fatal(err)
		}
	}
	c = metricsCheck{t, scrape(t, addr)}
	for _, h := range handlers {
		c.is(series("kuasar_sandboxes", h, "state", "notready"), 0)
		c.is(series("kuasar_sandboxes", h, "state", "ready"), 0)
	}
	c.is(`kuasar_wasm_host_instances{sandboxer="kuasar-wasm"}`, 0)
}

// TestConfigTypo: a typo in a controller's option stops the daemon at
// start, with an error that names the key, the plugin and the key meant;
// nothing is started.
func TestConfigTypo(t *testing.T) {
	dir := t.TempDir()
	l, err := scratch.Write(scratch.Options{Dir: filepath.Join(dir, "root"), Bridge: "ket" + randHex(3), Subnet: "10.249.0.0/24"})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(l.Config, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintln(f, "[plugins.'io.containerd.sandbox.controller.v1.kuasar-wasm']\n  keep_module = 4")
	f.Close()

	cmdCtx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(cmdCtx, filepath.Join(binDir, "containerd-kuasar"), "--config", l.Config)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err = cmd.Run()
	if cmdCtx.Err() != nil {
		t.Fatalf("the daemon did not stop on the typo:\n%s", out.String())
	}
	if err == nil {
		t.Fatalf("the daemon exited 0 on a typo:\n%s", out.String())
	}
	for _, want := range []string{
		`unknown key "keep_module"`,
		`[plugins.'io.containerd.sandbox.controller.v1.kuasar-wasm']`,
		`did you mean "keep_modules"?`,
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output does not say %q:\n%s", want, out.String())
		}
	}
	if _, err := os.Stat(l.Address); err == nil {
		t.Errorf("the daemon served %s before stopping", l.Address)
	}

	// `config default` documents every option of every Kuasar plugin.
	b, err := exec.Command(filepath.Join(binDir, "containerd-kuasar"), "config", "default").Output()
	if err != nil {
		t.Fatal(err)
	}
	section, prev := "", ""
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "[plugins.'"):
			section = line
		case strings.HasPrefix(line, "["):
			section = ""
		case strings.Contains(line, " = ") && strings.Contains(section, "kuasar") && !strings.Contains(section, "io.containerd.cri.v1") && !strings.HasPrefix(prev, "#"):
			t.Errorf("config default: %s in %s has no comment", line, section)
		}
		prev = line
	}
	for _, s := range []string{"controller.v1.kuasar-runc", "controller.v1.kuasar-wasm", "kuasar.monitor.v1.keeper"} {
		if !strings.Contains(string(b), s) {
			t.Errorf("config default has no section of %s", s)
		}
	}
}
