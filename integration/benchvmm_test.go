//go:build bench

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
)

// The microVM benchmark measures kuasar-vmm against its floor, in one run:
// the same QEMU, kernel and initramfs started by hand with no controller,
// to the agent's first answer (a cold boot, and a clone restored from a
// template); then pods through the CRI API, with templates and with cold
// boots: start over pods one after another and several at once, split into
// the controller's phases, and the memory each running VM pod costs the
// node.

// benchTBMiB is the TCG code cache of the floor's VMs: the controller's
// default (tb_size_mib).
const benchTBMiB = 64

// VMMPath is one way of starting VM pods.
type VMMPath struct {
	Floor      Latencies            `json:"floor"`
	Sequential Latencies            `json:"sequential"`
	Concurrent Latencies            `json:"concurrent"`
	Phases     map[string]Latencies `json:"phases"`
	// OverheadRatio is (pod start p50 - floor p50) / floor p50: what the
	// controller, CRI and the container add to the bare VM start.
	OverheadRatio float64 `json:"overhead_ratio"`
	Memory        VMMMem  `json:"memory"`
}

// VMMMem is what running VM pods cost the node.
type VMMMem struct {
	Pods int `json:"pods"`
	// HypervisorKB is the PSS of one VM's hypervisor (mean).
	HypervisorKB int `json:"hypervisor_kb"`
	// DaemonAddedKB is the daemon's growth per pod.
	DaemonAddedKB float64 `json:"daemon_added_kb"`
	// PerPodKB is all in: hypervisor and daemon growth.
	PerPodKB float64 `json:"per_pod_kb"`
}

// VMMReport is what the microVM run writes.
type VMMReport struct {
	Date      string             `json:"date"`
	Machine   map[string]string  `json:"machine"`
	Accel     string             `json:"accel"`
	VM        string             `json:"vm"`
	Paths     map[string]VMMPath `json:"paths"`
	TemplateS float64            `json:"template_build_s"`
}

func TestBenchVMM(t *testing.T) {
	needQEMU(t)
	seq, conc := envInt("KUASAR_BENCH_VMM_PODS", 20), envInt("KUASAR_BENCH_VMM_CONCURRENT", 10)
	memPods := envInt("KUASAR_BENCH_VMM_MEM_PODS", 5)
	outDir := os.Getenv("KUASAR_BENCH_OUT")
	if outDir == "" {
		outDir = "../bench/results"
	}
	img := guestImage(t)
	accel, err := hypervisor.ResolveAccel("auto", hypervisor.KVMUsable())
	if err != nil {
		t.Fatal(err)
	}
	rep := &VMMReport{
		Date:    time.Now().UTC().Format(time.RFC3339),
		Machine: machine(),
		Accel:   string(accel),
		VM:      fmt.Sprintf("1 vCPU, 128 MiB, tb-size %d MiB", benchTBMiB),
		Paths:   map[string]VMMPath{},
	}
	floors := vmmFloors(t, img, accel)

	for _, path := range []struct{ name, template string }{{"template", "auto"}, {"cold", "off"}} {
		t.Run(path.name, func(t *testing.T) {
			d := startDaemon(t, daemonOptions{bigSubnet: true, vmmConfig: "  template = \"" + path.template + "\"\n  boot_timeout = \"5m\""})
			tg := &target{Name: "kuasar-vmm " + path.name, Handler: kuasarVMM, d: d}
			if path.name == "template" {
				// The first pod builds the template: timed apart.
				begin := time.Now()
				tg.startPod(t, "warmup")
				rep.TemplateS = time.Since(begin).Seconds()
				tg.d.removePod(t, tg.pods[0])
				tg.pods, tg.phases = nil, nil
			}
			n := seq
			if path.name == "cold" {
				n = min(seq, envInt("KUASAR_BENCH_VMM_COLD_PODS", 5))
			}
			var lat []time.Duration
			for i := 0; i < n; i++ {
				lat = append(lat, tg.startPod(t, fmt.Sprintf("seq%d", i)))
			}
			p := VMMPath{Floor: floors[path.name], Sequential: summarise(lat), Phases: map[string]Latencies{}}
			for k, v := range tg.phases {
				p.Phases["CRI "+k] = summarise(v)
			}
			for k, v := range vmPhases(t, d) {
				p.Phases["VM "+k] = summarise(v)
			}
			if p.Floor.P50 > 0 {
				p.OverheadRatio = round((p.Sequential.P50 - p.Floor.P50) / p.Floor.P50)
			}
			for _, pod := range tg.pods {
				tg.d.removePod(t, pod)
			}
			tg.pods = nil
			c := conc
			if path.name == "cold" {
				c = min(conc, envInt("KUASAR_BENCH_VMM_COLD_CONCURRENT", 4))
			}
			cl, wall := tg.startConcurrently(t, c)
			p.Concurrent = summarise(cl)
			p.Concurrent.WallMs = ms(wall)
			for _, pod := range tg.pods {
				tg.d.removePod(t, pod)
			}
			tg.pods = nil
			p.Memory = vmmMemory(t, tg, min(memPods, c))
			rep.Paths[path.name] = p
		})
	}
	if err := writeVMM(outDir, rep); err != nil {
		t.Fatal(err)
	}
	t.Log("\n" + vmmMarkdown(rep))
}

// vmmFloors starts the guest by hand: cold boots to the agent's first
// hello, and clones of a template to their agent's answer.
func vmmFloors(t *testing.T, img *guest.Image, accel hypervisor.Accel) map[string]Latencies {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var cold []time.Duration
	for i := 0; i < envInt("KUASAR_BENCH_VMM_FLOOR_BOOTS", 3); i++ {
		b := bootVM(ctx, t, img, accel, 128, 32)
		cold = append(cold, b.ready)
		b.kill(t)
	}
	ram := filepath.Join("/dev/shm", "kvb-template-"+randHex(4))
	defer os.Remove(ram)
	state := filepath.Join(t.TempDir(), "state")
	tcfg := vmConfig(t, img, accel, 128, benchTBMiB)
	tcfg.Memory = hypervisor.MemoryBackend{Kind: hypervisor.MemoryFile, Path: ram, Share: true}
	tmpl := spawnVM(ctx, t, tcfg)
	tmpl.dialAgent(ctx, t)
	waitModulesThenPSS(ctx, t, tmpl)
	tmpl.client.Close()
	f, err := os.Create(state)
	if err != nil {
		t.Fatal(err)
	}
	if err := tmpl.vm.Save(ctx, f, true); err != nil {
		t.Fatal(err)
	}
	f.Close()
	tmpl.kill(t)
	var clones []time.Duration
	for i := 0; i < envInt("KUASAR_BENCH_VMM_FLOOR_CLONES", 5); i++ {
		ccfg := vmConfig(t, img, accel, 128, benchTBMiB)
		ccfg.Memory = hypervisor.MemoryBackend{Kind: hypervisor.MemoryFile, Path: ram}
		ccfg.Incoming = true
		c := spawnVM(ctx, t, ccfg)
		f, err := os.Open(state)
		if err != nil {
			t.Fatal(err)
		}
		err = c.vm.Restore(ctx, f, true)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		c.dialAgent(ctx, t)
		if _, err := c.agent.Hello(ctx, &agentapi.HelloRequest{}); err != nil {
			t.Fatal(err)
		}
		clones = append(clones, c.ready)
		c.kill(t)
	}
	return map[string]Latencies{"cold": summarise(cold), "template": summarise(clones)}
}

// vmPhaseLine is the daemon's log line of a started pod VM.
var vmPhaseLine = regexp.MustCompile(`msg="pod VM started".*agentReady=([0-9.]+m?s).*spawned=([0-9.]+m?s).*took=([0-9.]+m?s)`)

// vmPhases reads the controller's phases from the daemon's log: hypervisor
// spawned (and restored), agent ready, pod ready (network and sandbox set
// up).
func vmPhases(t *testing.T, d *Daemon) map[string][]time.Duration {
	b, err := os.ReadFile(filepath.Join(d.Dir, "daemon.log"))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]time.Duration{}
	for _, line := range strings.Split(string(b), "\n") {
		m := vmPhaseLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		for i, name := range []string{"agent ready", "hypervisor spawned", "pod ready"} {
			if v, err := time.ParseDuration(m[i+1]); err == nil {
				out[name] = append(out[name], v)
			}
		}
	}
	return out
}

// vmmMemory starts n pods and measures what each costs.
func vmmMemory(t *testing.T, tg *target, n int) VMMMem {
	time.Sleep(time.Second)
	idle := pssKB(tg.d.cmd.Process.Pid)
	for i := 0; i < n; i++ {
		tg.startPod(t, fmt.Sprintf("mem%d", i))
	}
	time.Sleep(3 * time.Second)
	m := VMMMem{Pods: n}
	var hyp int
	for _, pod := range tg.pods {
		hyp += pssKB(tg.d.vmInfo(t, pod).VMPid)
	}
	m.HypervisorKB = hyp / n
	m.DaemonAddedKB = float64(pssKB(tg.d.cmd.Process.Pid)-idle) / float64(n)
	m.PerPodKB = float64(m.HypervisorKB) + m.DaemonAddedKB
	for _, pod := range tg.pods {
		tg.d.removePod(t, pod)
	}
	tg.pods = nil
	return m
}

func vmmMarkdown(rep *VMMReport) string {
	var b strings.Builder
	fmt.Fprintf(&b, "### kuasar-vmm (%s, accel %s, VM %s; %s, %s CPUs)\n\n", rep.Date, rep.Accel, rep.VM, rep.Machine["cpu"], rep.Machine["cpus"])
	fmt.Fprintf(&b, "Template build (the first pod of an image and size): %.1f s.\n\n", rep.TemplateS)
	b.WriteString("| figure | template (clone) | cold boot |\n|---|---:|---:|\n")
	row := func(name string, f func(p VMMPath) string) {
		fmt.Fprintf(&b, "| %s | %s | %s |\n", name, f(rep.Paths["template"]), f(rep.Paths["cold"]))
	}
	row("floor: QEMU exec to the agent's answer, p50 (no controller)", func(p VMMPath) string { return fmt.Sprintf("%.0f ms", p.Floor.P50) })
	row("pod start (RunPodSandbox + Create + Start), sequential p50 / p99", func(p VMMPath) string {
		return fmt.Sprintf("%.0f / %.0f ms (n=%d)", p.Sequential.P50, p.Sequential.P99, p.Sequential.N)
	})
	row("controller + CRI overhead over the floor, p50", func(p VMMPath) string { return fmt.Sprintf("%.2fx the floor", p.OverheadRatio) })
	row("pod start, concurrent p50 / wall", func(p VMMPath) string {
		return fmt.Sprintf("%.0f / %.0f ms (n=%d)", p.Concurrent.P50, p.Concurrent.WallMs, p.Concurrent.N)
	})
	for _, ph := range []string{"VM hypervisor spawned", "VM agent ready", "VM pod ready", "CRI RunPodSandbox", "CRI CreateContainer", "CRI StartContainer"} {
		row(ph+", p50", func(p VMMPath) string { return fmt.Sprintf("%.0f ms", p.Phases[ph].P50) })
	}
	row("hypervisor PSS per running VM pod", func(p VMMPath) string { return fmt.Sprintf("%.1f MB", float64(p.Memory.HypervisorKB)/1024) })
	row("daemon growth per VM pod", func(p VMMPath) string { return fmt.Sprintf("%.2f MB", p.Memory.DaemonAddedKB/1024) })
	row("all in, per VM pod", func(p VMMPath) string { return fmt.Sprintf("**%.1f MB**", p.Memory.PerPodKB/1024) })
	return b.String()
}

func writeVMM(dir string, rep *VMMReport) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	stamp := time.Now().UTC().Format("20060102-150405")
	md := vmmMarkdown(rep)
	for name, data := range map[string][]byte{
		"vmm-" + stamp + ".json": b, "vmm-" + stamp + ".md": []byte(md),
		"vmm-latest.json": b, "vmm-latest.md": []byte(md),
	} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			return err
		}
	}
	return nil
}
