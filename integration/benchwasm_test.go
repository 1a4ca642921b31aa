//go:build bench

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/integration/images"
)

// The Wasm benchmark measures kuasar-wasm on its own (stock containerd has
// no Wasm runtime to compare with): pod start, cold (a module the node has
// never compiled) and warm, through the CRI API from this Go client, and the
// memory a running Wasm pod costs, at growing numbers of pods.

// WasmMemory is what the node spends on n running Wasm pods.
type WasmMemory struct {
	Pods int `json:"pods"`
	// TotalKB is the PSS of the daemon, the keeper and the Wasm host.
	TotalKB int `json:"total_kb"`
	// LinearKB is the modules' own linear memory (the workload).
	LinearKB int `json:"linear_kb"`
	// PerPodKB is (TotalKB - idle) / pods: what one more pod costs, its
	// linear memory included; ManagementPerPodKB leaves that out.
	PerPodKB           float64        `json:"per_pod_kb"`
	ManagementPerPodKB float64        `json:"management_per_pod_kb"`
	ByProcess          map[string]int `json:"by_process_kb"`
	Processes          int            `json:"processes"`
}

// WasmReport is what a Wasm run writes.
type WasmReport struct {
	Date     string               `json:"date"`
	Machine  map[string]string    `json:"machine"`
	Versions map[string]string    `json:"versions"`
	Pods     int                  `json:"pods"`
	Start    map[string]Latencies `json:"pod_start"`
	Phases   map[string]Latencies `json:"pod_start_phases"`
	IdleKB   int                  `json:"idle_kb"`
	// AppIdleKB is the idle figure the Go module's pods are counted from.
	AppIdleKB int            `json:"app_idle_kb"`
	Memory    []WasmMemory   `json:"memory"`
	AppPods   WasmMemory     `json:"memory_go_module"`
	Modules   map[string]int `json:"module_bytes"`
}

func TestBenchWasm(t *testing.T) {
	n := envInt("KUASAR_BENCH_PODS", 50)
	maxPods := envInt("KUASAR_BENCH_WASM_MAX_PODS", 1000)
	outDir := os.Getenv("KUASAR_BENCH_OUT")
	if outDir == "" {
		outDir = "../bench/results"
	}
	d := startDaemon(t, daemonOptions{bigSubnet: true})
	app, err := images.AppModule()
	must(t, err, "building the Go test module")
	rep := &WasmReport{
		Date:    time.Now().UTC().Format(time.RFC3339),
		Machine: machine(),
		Versions: map[string]string{
			"containerd-kuasar": strings.Fields(mustOut(t, filepath.Join(binDir, "containerd-kuasar"), "--version"))[1],
			"wazero":            wazeroVersion(),
		},
		Pods:    n,
		Start:   map[string]Latencies{},
		Phases:  map[string]Latencies{},
		Modules: map[string]int{"go": len(app), "minimal": len(images.SleepModule())},
	}
	// n variants of the Go module, each a module the host never compiled.
	for i := 0; i < n; i++ {
		ref := fmt.Sprintf("docker.io/library/wasm-cold:%d", i)
		img, err := images.WasmLayerImage(images.WithCustomSection(app, "kuasar-bench", []byte(fmt.Sprint(i))), "/app.wasm")
		must(t, err, "cold image")
		must(t, images.Push(context.Background(), registry, ref, img), "pushing %s", ref)
		d.pull(t, ref)
	}
	for _, img := range []string{images.WasmLayer, images.WasmSleep} {
		d.pull(t, img)
	}
	b := &wasmBench{d: d, phases: map[string]map[string][]time.Duration{}}

	// Warm up once (CNI, the host's own start), then idle memory.
	b.removeAll(t, []string{b.start(t, "warmup", images.WasmSleep, false, "warmup")})
	time.Sleep(time.Second)
	d.recordKeeper()
	rep.IdleKB = managementMemory(d).TotalKB

	run := func(kind string, count int, image func(int) string, hostNet bool) []string {
		var pods []string
		var lat []time.Duration
		for i := 0; i < count; i++ {
			begin := time.Now()
			pods = append(pods, b.start(t, fmt.Sprintf("%s%d", kind, i), image(i), hostNet, kind))
			lat = append(lat, time.Since(begin))
		}
		rep.Start[kind] = summarise(lat)
		for phase, ds := range b.phases[kind] {
			rep.Phases[kind+" "+phase] = summarise(ds)
		}
		return pods
	}
	// Memory first, on a host that has run nothing else: 10, 50, 100 ...
	// maxPods minimal pods running.
	var pods []string
	for _, size := range []int{10, 50, 100, maxPods} {
		if size > maxPods || (len(rep.Memory) > 0 && size <= rep.Memory[len(rep.Memory)-1].Pods) {
			continue
		}
		for len(pods) < size {
			pods = append(pods, b.start(t, fmt.Sprintf("mem%d", len(pods)), images.WasmSleep, false, "memory"))
		}
		rep.Memory = append(rep.Memory, b.memory(t, len(pods), rep.IdleKB))
	}
	b.removeAll(t, pods)
	// A daemon that ran 1,000 pods keeps a large heap: restart it (the Wasm
	// host keeps running) so that the next figures start from idle again.
	d.restart(syscall.SIGTERM)
	time.Sleep(time.Second)
	d.recordKeeper()
	rep.AppIdleKB = managementMemory(d).TotalKB

	b.removeAll(t, run("warm-minimal", n, func(int) string { return images.WasmSleep }, false))
	b.removeAll(t, run("warm-minimal-hostnet", n, func(int) string { return images.WasmSleep }, true))
	// The Go module, compiled once beforehand; then n modules never
	// compiled.
	b.removeAll(t, []string{b.start(t, "compile", images.WasmLayer, false, "compile")})
	appPods := run("warm", n, func(int) string { return images.WasmLayer }, false)
	rep.AppPods = b.memory(t, len(appPods), rep.AppIdleKB)
	b.removeAll(t, appPods)
	b.removeAll(t, run("cold", n, func(i int) string { return fmt.Sprintf("docker.io/library/wasm-cold:%d", i) }, false))

	must(t, writeWasm(outDir, rep), "writing results")
	t.Log("\n" + wasmMarkdown(rep))
	if os.Getenv("KUASAR_BENCH_KEEP") != "" {
		t.Fail() // keeps the daemon's directory for inspection
	}
}

type wasmBench struct {
	d      *Daemon
	phases map[string]map[string][]time.Duration
	ctrs   map[string]string
}

// start runs a Wasm pod with one container of image, until it runs.
func (b *wasmBench) start(t *testing.T, name, image string, hostNet bool, kind string) string {
	t.Helper()
	d := b.d
	podCfg := d.podConfig("wb-" + name)
	if hostNet {
		podCfg.Linux.SecurityContext.NamespaceOptions.Network = runtimeapi.NamespaceMode_NODE
	}
	args := []string{"sleep"}
	if image == images.WasmSleep {
		args = nil
	}
	cfg := wasmConfig("work", image, args...)
	begin := time.Now()
	pod := d.runPod(t, kuasarWasm, podCfg)
	ran := time.Now()
	id := d.create(t, pod, podCfg, cfg)
	created := time.Now()
	d.start1(t, id)
	done := time.Now()
	if b.phases[kind] == nil {
		b.phases[kind] = map[string][]time.Duration{}
	}
	p := b.phases[kind]
	p["RunPodSandbox"] = append(p["RunPodSandbox"], ran.Sub(begin))
	p["CreateContainer"] = append(p["CreateContainer"], created.Sub(ran))
	p["StartContainer"] = append(p["StartContainer"], done.Sub(created))
	if b.ctrs == nil {
		b.ctrs = map[string]string{}
	}
	b.ctrs[pod] = id
	return pod
}

func (b *wasmBench) removeAll(t *testing.T, pods []string) {
	t.Helper()
	for _, p := range pods {
		b.d.removePod(t, p)
		delete(b.ctrs, p)
	}
}

// memory reads what the node spends with pods running.
func (b *wasmBench) memory(t *testing.T, pods, idleKB int) WasmMemory {
	t.Helper()
	time.Sleep(2 * time.Second)
	b.d.recordKeeper()
	m := managementMemory(b.d)
	var linear uint64
	for _, id := range b.ctrs {
		r, err := b.d.RS.ContainerStats(ctx(t), &runtimeapi.ContainerStatsRequest{ContainerId: id})
		must(t, err, "ContainerStats")
		linear += r.Stats.Memory.GetWorkingSetBytes().GetValue()
	}
	w := WasmMemory{Pods: pods, TotalKB: m.TotalKB, LinearKB: int(linear >> 10), ByProcess: m.ByProcess, Processes: m.Processes}
	w.PerPodKB = float64(m.TotalKB-idleKB) / float64(pods)
	w.ManagementPerPodKB = float64(m.TotalKB-idleKB-w.LinearKB) / float64(pods)
	t.Logf("%d wasm pods: %+v", pods, w)
	return w
}

func mustOut(t *testing.T, name string, args ...string) string {
	out, err := execOut(name, args...)
	must(t, err, "%s", name)
	return out
}

func wazeroVersion() string {
	b, err := os.ReadFile("../go.mod")
	if err != nil {
		return ""
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "github.com/tetratelabs/wazero" {
			return f[1]
		}
	}
	return ""
}

func wasmMarkdown(rep *WasmReport) string {
	var b strings.Builder
	fmt.Fprintf(&b, "### containerd-kuasar `kuasar-wasm` (%s)\n\n", rep.Date)
	fmt.Fprintf(&b, "Machine: %s, %s CPUs, %s, kernel %s. Versions: %s. Modules: Go test module %d bytes, minimal module %d bytes.\n\n",
		rep.Machine["cpu"], rep.Machine["cpus"], rep.Machine["memory"], rep.Machine["kernel"], joinMap(rep.Versions), rep.Modules["go"], rep.Modules["minimal"])
	fmt.Fprintf(&b, "Pod start through the CRI API (RunPodSandbox + CreateContainer + StartContainer), %d pods one after another:\n\n", rep.Pods)
	fmt.Fprintf(&b, "| start | p50 | p99 | RunPodSandbox p50 | CreateContainer p50 | StartContainer p50 |\n|---|---:|---:|---:|---:|---:|\n")
	labels := map[string]string{
		"cold":                 "cold: Go module never compiled on the node",
		"warm":                 "warm: Go module, compiled",
		"warm-minimal":         "warm: minimal module",
		"warm-minimal-hostnet": "warm: minimal module, host network (no CNI)",
	}
	for _, k := range []string{"cold", "warm", "warm-minimal", "warm-minimal-hostnet"} {
		s := rep.Start[k]
		fmt.Fprintf(&b, "| %s | %.1f ms | %.1f ms | %.1f ms | %.1f ms | %.1f ms |\n", labels[k], s.P50, s.P99,
			rep.Phases[k+" RunPodSandbox"].P50, rep.Phases[k+" CreateContainer"].P50, rep.Phases[k+" StartContainer"].P50)
	}
	fmt.Fprintf(&b, "\nMemory of running Wasm pods (PSS of containerd-kuasar, the keeper and the Wasm host; idle: %d kB):\n\n", rep.IdleKB)
	fmt.Fprintf(&b, "| running pods | total | per pod | of which linear memory | per pod without it | processes |\n|---:|---:|---:|---:|---:|---:|\n")
	row := func(label string, m WasmMemory) {
		fmt.Fprintf(&b, "| %s | %d kB | %.0f kB | %.0f kB | %.0f kB | %d |\n", label, m.TotalKB, m.PerPodKB, float64(m.LinearKB)/float64(m.Pods), m.ManagementPerPodKB, m.Processes)
	}
	for _, m := range rep.Memory {
		row(fmt.Sprintf("%d (minimal module)", m.Pods), m)
	}
	row(fmt.Sprintf("%d (Go module)", rep.AppPods.Pods), rep.AppPods)
	if len(rep.Memory) > 0 {
		last := rep.Memory[len(rep.Memory)-1]
		fmt.Fprintf(&b, "\nAt %d pods: %v (kB PSS). 1,000 minimal pods: %.1f GiB; 1,000 pods of the Go module: %.1f GiB (from its per-pod figure).\n",
			last.Pods, last.ByProcess, (float64(rep.IdleKB)+1000*last.PerPodKB)/(1<<20), (float64(rep.IdleKB)+1000*rep.AppPods.PerPodKB)/(1<<20))
	}
	return b.String()
}

func writeWasm(dir string, rep *WasmReport) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	md := wasmMarkdown(rep)
	stamp := time.Now().UTC().Format("20060102-150405")
	files := map[string][]byte{
		"wasm-" + stamp + ".json": js, "wasm-" + stamp + ".md": []byte(md),
		"wasm-latest.json": js, "wasm-latest.md": []byte(md),
	}
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if err := os.WriteFile(filepath.Join(dir, n), files[n], 0o644); err != nil {
			return err
		}
	}
	return nil
}
