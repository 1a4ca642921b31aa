//go:build bench

package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The gVisor benchmark compares, in one run on one machine, the stock way
// to run gVisor (stock containerd, gVisor's containerd-shim-runsc-v1, a
// pause container in each sandbox) with containerd-kuasar's kuasar-gvisor,
// on the same runsc binary and platform, driven from this one Go CRI
// client. It reports figures and ratios; it never fails on speed.

// GVisorMemory is what a number of running gVisor pods cost on the node.
type GVisorMemory struct {
	Pods int `json:"pods"`
	// Management is everything that is not a sandbox: the daemon, shims,
	// the keeper.
	ManagementKB       int            `json:"management_kb"`
	ManagementPerPodKB float64        `json:"management_per_pod_kb"`
	ManagementAddedKB  float64        `json:"management_added_per_pod_kb"` // (total - idle) / pods
	ManagementByProc   map[string]int `json:"management_by_process_kb"`
	// Sandbox is gVisor's own processes: sentries, gofers and the
	// sentries' stub processes.
	SandboxKB       int     `json:"sandbox_kb"`
	SandboxPerPodKB float64 `json:"sandbox_per_pod_kb"`
	// Processes on the node per pod, management and sandbox.
	ManagementProcsPerPod float64 `json:"management_processes_per_pod"`
	SandboxProcsPerPod    float64 `json:"sandbox_processes_per_pod"`
}

// GVisorResult is one side's figures.
type GVisorResult struct {
	Handler         string               `json:"handler"`
	StartSequential Latencies            `json:"pod_start_sequential"`
	StartConcurrent Latencies            `json:"pod_start_concurrent"`
	StopRemove      Latencies            `json:"pod_stop_remove"`
	Phases          map[string]Latencies `json:"pod_start_phases"`
	IdleKB          int                  `json:"idle_management_kb"`
	Memory          []GVisorMemory       `json:"memory"`
}

// GVisorReport is what a run writes.
type GVisorReport struct {
	Date       string                   `json:"date"`
	Machine    map[string]string        `json:"machine"`
	Versions   map[string]string        `json:"versions"`
	Sequential int                      `json:"sequential_pods"`
	Concurrent int                      `json:"concurrent_pods"`
	Results    map[string]*GVisorResult `json:"results"`
	Ratios     map[string]float64       `json:"ratios_kuasar_over_stock"`
}

func TestBenchGVisor(t *testing.T) {
	n := envInt("KUASAR_BENCH_PODS", 50)
	conc := envInt("KUASAR_BENCH_GVISOR_CONCURRENT", 20)
	outDir := os.Getenv("KUASAR_BENCH_OUT")
	if outDir == "" {
		outDir = "../bench/results"
	}
	stock := &target{Name: "stock-runsc", Handler: stockGVisor, d: startDaemon(t, daemonOptions{stock: true, stockGVisor: true})}
	kuasar := &target{Name: kuasarGVisor, Handler: kuasarGVisor, d: startDaemon(t, daemonOptions{})}
	targets := []*target{stock, kuasar}
	rep := &GVisorReport{
		Date:       time.Now().UTC().Format(time.RFC3339),
		Machine:    machine(),
		Versions:   versions(t, stock.d, kuasar.d),
		Sequential: n,
		Concurrent: conc,
		Results:    map[string]*GVisorResult{},
	}
	if out, err := execOut(filepath.Join(binDir, "runsc"), "--version"); err == nil {
		rep.Versions["runsc"] = strings.TrimPrefix(strings.Fields(out)[2], "version-")
	}
	for _, tg := range targets {
		rep.Results[tg.Name] = &GVisorResult{Handler: tg.Handler}
		// Warm up: the first pod pays for one-off work (image unpack, page
		// cache of runsc, CNI plugin loading) on both sides.
		tg.startPod(t, "warmup")
		tg.stopRemove(t, tg.pods[0])
		tg.pods, tg.phases = nil, nil
		time.Sleep(time.Second)
		tg.d.recordKeeper()
		rep.Results[tg.Name].IdleKB = managementMemory(tg.d).TotalKB
	}

	// Sequential starts, alternating the two daemons pod by pod so that
	// machine noise hits both alike; memory read at 10 pods on the way.
	seq := map[string][]time.Duration{}
	for i := 0; i < n; i++ {
		for _, tg := range targets {
			seq[tg.Name] = append(seq[tg.Name], tg.startPod(t, fmt.Sprintf("seq%d", i)))
		}
		if i+1 == 10 && n > 10 {
			for _, tg := range targets {
				tg.d.recordKeeper()
				r := rep.Results[tg.Name]
				r.Memory = append(r.Memory, gvisorMemory(tg, r.IdleKB))
			}
		}
	}
	for _, tg := range targets {
		tg.d.recordKeeper()
		r := rep.Results[tg.Name]
		r.StartSequential = summarise(seq[tg.Name])
		r.Phases = map[string]Latencies{}
		for phase, ds := range tg.phases {
			r.Phases[phase] = summarise(ds)
		}
		r.Memory = append(r.Memory, gvisorMemory(tg, r.IdleKB))
	}

	// Stop and remove every pod, one at a time, alternating.
	stops := map[string][]time.Duration{}
	for i := 0; i < n; i++ {
		for _, tg := range targets {
			stops[tg.Name] = append(stops[tg.Name], tg.stopRemove(t, tg.pods[i]))
		}
	}
	for _, tg := range targets {
		rep.Results[tg.Name].StopRemove = summarise(stops[tg.Name])
		tg.pods = nil
	}

	// conc pods started at once, one side after the other.
	for _, tg := range targets {
		lat, wall := tg.startConcurrently(t, conc)
		r := rep.Results[tg.Name]
		r.StartConcurrent = summarise(lat)
		r.StartConcurrent.WallMs = ms(wall)
		for _, p := range tg.pods {
			tg.stopRemove(t, p)
		}
		tg.pods = nil
	}

	rep.Ratios = gvisorRatios(rep.Results[stock.Name], rep.Results[kuasar.Name])
	if err := writeGVisor(outDir, rep); err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + gvisorMarkdown(rep))
}

// gvisorMemory reads the management and sandbox PSS of a side's pods.
func gvisorMemory(tg *target, idleKB int) GVisorMemory {
	time.Sleep(2 * time.Second) // let start-up allocations settle
	m := GVisorMemory{Pods: len(tg.pods)}
	mgmt := managementMemory(tg.d)
	m.ManagementKB, m.ManagementByProc = mgmt.TotalKB, mgmt.ByProcess
	m.ManagementPerPodKB = float64(mgmt.TotalKB) / float64(m.Pods)
	m.ManagementAddedKB = float64(mgmt.TotalKB-idleKB) / float64(m.Pods)
	m.ManagementProcsPerPod = float64(mgmt.Processes-1) / float64(m.Pods) // beyond the daemon itself
	sandbox := gvisorProcs(tg.d)
	for _, p := range sandbox {
		m.SandboxKB += pssKB(p.Pid)
	}
	m.SandboxPerPodKB = float64(m.SandboxKB) / float64(m.Pods)
	m.SandboxProcsPerPod = float64(len(sandbox)) / float64(m.Pods)
	return m
}

func gvisorRatios(s, k *GVisorResult) map[string]float64 {
	r := map[string]float64{}
	div := func(name string, a, b float64) {
		if b > 0 {
			r[name] = round(a / b)
		}
	}
	div("pod_start_sequential_p50", k.StartSequential.P50, s.StartSequential.P50)
	div("pod_start_sequential_p99", k.StartSequential.P99, s.StartSequential.P99)
	div("pod_start_concurrent_p50", k.StartConcurrent.P50, s.StartConcurrent.P50)
	div("pod_start_concurrent_p99", k.StartConcurrent.P99, s.StartConcurrent.P99)
	div("pod_start_concurrent_wall", k.StartConcurrent.WallMs, s.StartConcurrent.WallMs)
	div("pod_stop_remove_p50", k.StopRemove.P50, s.StopRemove.P50)
	div("pod_stop_remove_p99", k.StopRemove.P99, s.StopRemove.P99)
	for i := range s.Memory {
		if i < len(k.Memory) {
			n := s.Memory[i].Pods
			div(fmt.Sprintf("management_per_pod_at_%d", n), k.Memory[i].ManagementPerPodKB, s.Memory[i].ManagementPerPodKB)
			div(fmt.Sprintf("management_added_per_pod_at_%d", n), k.Memory[i].ManagementAddedKB, s.Memory[i].ManagementAddedKB)
			div(fmt.Sprintf("sandbox_per_pod_at_%d", n), k.Memory[i].SandboxPerPodKB, s.Memory[i].SandboxPerPodKB)
		}
	}
	return r
}

func gvisorMarkdown(rep *GVisorReport) string {
	s, k := rep.Results["stock-runsc"], rep.Results[kuasarGVisor]
	var b strings.Builder
	fmt.Fprintf(&b, "### containerd-kuasar `kuasar-gvisor` vs stock containerd + containerd-shim-runsc-v1 (%s)\n\n", rep.Date)
	fmt.Fprintf(&b, "Machine: %s, %s CPUs, %s, kernel %s. Versions: %s. Both sides run the same runsc, platform systrap; one busybox container per pod.\n\n",
		rep.Machine["cpu"], rep.Machine["cpus"], rep.Machine["memory"], rep.Machine["kernel"], joinMap(rep.Versions))
	fmt.Fprintf(&b, "| figure | stock (shim per container + pause) | kuasar-gvisor | kuasar / stock |\n|---|---:|---:|---:|\n")
	row := func(name string, a, c float64, unit, ratioKey string) {
		fmt.Fprintf(&b, "| %s | %.1f %s | %.1f %s | **%.3f** |\n", name, a, unit, c, unit, rep.Ratios[ratioKey])
	}
	row(fmt.Sprintf("pod start, sequential, p50 (%d pods)", s.StartSequential.N), s.StartSequential.P50, k.StartSequential.P50, "ms", "pod_start_sequential_p50")
	row("pod start, sequential, p99", s.StartSequential.P99, k.StartSequential.P99, "ms", "pod_start_sequential_p99")
	for _, phase := range []string{"RunPodSandbox", "CreateContainer", "StartContainer"} {
		fmt.Fprintf(&b, "| &nbsp;&nbsp;of which %s, p50 | %.1f ms | %.1f ms | %.3f |\n", phase, s.Phases[phase].P50, k.Phases[phase].P50, round(k.Phases[phase].P50/s.Phases[phase].P50))
	}
	row(fmt.Sprintf("pod start, %d at once, p50", s.StartConcurrent.N), s.StartConcurrent.P50, k.StartConcurrent.P50, "ms", "pod_start_concurrent_p50")
	row("pod start, at once, p99", s.StartConcurrent.P99, k.StartConcurrent.P99, "ms", "pod_start_concurrent_p99")
	row("pod start, at once, wall time", s.StartConcurrent.WallMs, k.StartConcurrent.WallMs, "ms", "pod_start_concurrent_wall")
	row(fmt.Sprintf("pod stop+remove, p50 (%d pods)", s.StopRemove.N), s.StopRemove.P50, k.StopRemove.P50, "ms", "pod_stop_remove_p50")
	row("pod stop+remove, p99", s.StopRemove.P99, k.StopRemove.P99, "ms", "pod_stop_remove_p99")
	for i := range s.Memory {
		if i < len(k.Memory) {
			n := s.Memory[i].Pods
			row(fmt.Sprintf("management PSS per pod, %d pods (total / pods)", n), s.Memory[i].ManagementPerPodKB, k.Memory[i].ManagementPerPodKB, "kB", fmt.Sprintf("management_per_pod_at_%d", n))
			row(fmt.Sprintf("management PSS added per pod, %d pods", n), s.Memory[i].ManagementAddedKB, k.Memory[i].ManagementAddedKB, "kB", fmt.Sprintf("management_added_per_pod_at_%d", n))
			row(fmt.Sprintf("sandbox PSS per pod (sentry, gofers, stubs), %d pods", n), s.Memory[i].SandboxPerPodKB, k.Memory[i].SandboxPerPodKB, "kB", fmt.Sprintf("sandbox_per_pod_at_%d", n))
		}
	}
	last := len(s.Memory) - 1
	if last >= 0 && last < len(k.Memory) {
		fmt.Fprintf(&b, "\nAt %d pods: management processes per pod, stock %.1f, kuasar-gvisor %.2f; gVisor processes per pod, stock %.1f, kuasar-gvisor %.1f. Management PSS by process (kB): stock %v, kuasar-gvisor %v.\n",
			s.Memory[last].Pods, s.Memory[last].ManagementProcsPerPod, k.Memory[last].ManagementProcsPerPod,
			s.Memory[last].SandboxProcsPerPod, k.Memory[last].SandboxProcsPerPod, s.Memory[last].ManagementByProc, k.Memory[last].ManagementByProc)
	}
	return b.String()
}

func writeGVisor(dir string, rep *GVisorReport) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	md := gvisorMarkdown(rep)
	stamp := time.Now().UTC().Format("20060102-150405")
	for name, data := range map[string][]byte{
		"gvisor-" + stamp + ".json": b, "gvisor-" + stamp + ".md": []byte(md),
		"gvisor-latest.json": b, "gvisor-latest.md": []byte(md),
	} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			return err
		}
	}
	return nil
}
