#pragma once
// An SVG chart of an AdapterReport: normalised spectra σ_i/σ₁ on a log scale,
// one line per module type (the median over layers), energy ranks marked.

#include <lora/analysis/inspect.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

namespace lora::analysis {

namespace detail {
inline std::string svg_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '<') o += "&lt;";
    else if (c == '>') o += "&gt;";
    else if (c == '&') o += "&amp;";
    else if (c == '"') o += "&quot;";
    else o += c;
  }
  return o;
}
inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
}  // namespace detail

/// The chart as an SVG document (self-contained, no scripts or fonts to fetch).
/// Each line is one module type: at index i the median over its modules of σ_i/σ₁.
/// Markers on a line show the type's median energy rank per threshold; dashed
/// vertical lines the adapter-wide recommendation (every module keeps τ).
inline std::string spectrum_svg(const AdapterReport& rep, const std::string& title = "") {
  const double W = 960, H = 600, left = 80, right = 230, top = 70, bottom = 60;
  const double pw = W - left - right, ph = H - top - bottom;
  // groups by module type, in order of first appearance
  std::vector<std::string> types;
  std::map<std::string, std::vector<const ModuleReport*>> groups;
  Index max_p = 1;
  double floor_v = 0.1;
  for (const auto& m : rep.modules) {
    const std::string t = module_type(m.name);
    if (!groups.count(t)) types.push_back(t);
    groups[t].push_back(&m);
    max_p = std::max(max_p, m.singular_values.size());
    for (Index i = 0; i < m.singular_values.size(); ++i) {
      const double v = m.singular_values(0) > 0 ? m.singular_values(i) / m.singular_values(0) : 0;
      if (v > 0) floor_v = std::min(floor_v, v);
    }
  }
  const int decades = std::clamp(static_cast<int>(std::ceil(-std::log10(floor_v))), 1, 8);
  const double y_min = std::pow(10.0, -decades);
  auto X = [&](double i) { return left + (max_p == 1 ? pw / 2 : (i - 1) / double(max_p - 1) * pw); };
  auto Y = [&](double v) { return top + (-std::log10(std::max(v, y_min))) / decades * ph; };
  static const char* palette[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                  "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"};
  static const char* marker_shapes[] = {"circle", "square", "diamond", "triangle"};

  std::string s;
  s += fmt::format(R"(<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" viewBox="0 0 {} {}" )"
                   R"(font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="13">)"
                   "\n",
                   W, H, W, H);
  s += fmt::format(R"(<rect width="{}" height="{}" fill="white"/>)" "\n", W, H);
  const std::string head = title.empty() ? "Singular value spectra of ΔW = s·B·A" : title;
  s += fmt::format(R"(<text x="{}" y="28" font-size="18" font-weight="bold">{}</text>)" "\n", left,
                   detail::svg_escape(head));
  Index max_r = 0;
  for (const auto& m : rep.modules) max_r = std::max(max_r, m.rank);
  s += fmt::format(R"(<text x="{}" y="50" fill="#444">σᵢ/σ₁, median over the modules of each type · {} modules · )"
                   R"(r ≤ {} · log scale</text>)" "\n",
                   left, rep.modules.size(), max_r);
  // grid and axes
  for (int d = 0; d <= decades; ++d) {
    const double y = top + double(d) / decades * ph;
    s += fmt::format(R"(<line x1="{}" y1="{:.1f}" x2="{}" y2="{:.1f}" stroke="#e3e3e3"/>)" "\n", left, y, left + pw, y);
    s += fmt::format(R"(<text x="{}" y="{:.1f}" text-anchor="end" fill="#333">{}</text>)" "\n", left - 8, y + 4,
                     d == 0 ? std::string("1") : fmt::format("1e-{}", d));
  }
  const Index step = max_p <= 16 ? 1 : max_p <= 40 ? 4 : max_p <= 80 ? 8 : max_p <= 160 ? 16 : 32;
  for (Index i = 1; i <= max_p; i += (i == 1 && step > 1 ? step - 1 : step)) {
    s += fmt::format(R"(<line x1="{:.1f}" y1="{}" x2="{:.1f}" y2="{}" stroke="#f0f0f0"/>)" "\n", X(double(i)), top,
                     X(double(i)), top + ph);
    s += fmt::format(R"(<text x="{:.1f}" y="{}" text-anchor="middle" fill="#333">{}</text>)" "\n", X(double(i)),
                     top + ph + 18, i);
  }
  s += fmt::format(R"(<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#333"/>)" "\n", left, top, pw, ph);
  s += fmt::format(R"(<text x="{}" y="{}" text-anchor="middle" fill="#333">index i of the singular value</text>)" "\n",
                   left + pw / 2, H - 18);
  s += fmt::format(R"~(<text transform="translate(22,{}) rotate(-90)" text-anchor="middle" fill="#333">σᵢ / σ₁</text>)~"
                   "\n",
                   top + ph / 2);
  // adapter-wide energy ranks
  for (std::size_t t = 0; t < rep.recommendations.size(); ++t) {
    const auto& rec = rep.recommendations[t];
    const double x = X(double(std::max<Index>(rec.rank, 1)));
    s += fmt::format(R"(<line x1="{:.1f}" y1="{}" x2="{:.1f}" y2="{}" stroke="#555" stroke-dasharray="6,4"/>)" "\n", x,
                     top, x, top + ph);
    s += fmt::format(R"(<text x="{:.1f}" y="{}" fill="#333" font-size="12" text-anchor="{}">{:g}%: r = {}</text>)" "\n",
                     x + (t % 2 ? -4 : 4), top + 14 + 14 * double(t), t % 2 ? "end" : "start", rec.tau * 100, rec.rank);
  }
  auto marker = [&](int kind, double x, double y, const char* color) {
    const std::string shape = marker_shapes[kind % 4];
    if (shape == "circle")
      return fmt::format(R"(<circle cx="{:.1f}" cy="{:.1f}" r="5" fill="white" stroke="{}" stroke-width="2"/>)", x, y,
                         color);
    if (shape == "square")
      return fmt::format(R"(<rect x="{:.1f}" y="{:.1f}" width="9" height="9" fill="white" stroke="{}" stroke-width="2"/>)",
                         x - 4.5, y - 4.5, color);
    if (shape == "diamond")
      return fmt::format(R"(<polygon points="{:.1f},{:.1f} {:.1f},{:.1f} {:.1f},{:.1f} {:.1f},{:.1f}" fill="white" )"
                         R"(stroke="{}" stroke-width="2"/>)",
                         x, y - 6, x + 6, y, x, y + 6, x - 6, y, color);
    return fmt::format(R"(<polygon points="{:.1f},{:.1f} {:.1f},{:.1f} {:.1f},{:.1f}" fill="white" stroke="{}" )"
                       R"(stroke-width="2"/>)",
                       x, y - 6, x + 6, y + 5, x - 6, y + 5, color);
  };
  // one line per type
  double ly = top + 10;
  for (std::size_t g = 0; g < types.size(); ++g) {
    const auto& mods = groups[types[g]];
    const char* color = palette[g % 10];
    Index p = 0;
    for (auto* m : mods) p = std::max(p, m->singular_values.size());
    std::vector<double> med(static_cast<std::size_t>(p));
    for (Index i = 0; i < p; ++i) {
      std::vector<double> v;
      for (auto* m : mods)
        if (i < m->singular_values.size() && m->singular_values(0) > 0)
          v.push_back(m->singular_values(i) / m->singular_values(0));
      med[static_cast<std::size_t>(i)] = detail::median(v);
    }
    std::string pts;
    for (Index i = 0; i < p; ++i) pts += fmt::format("{:.1f},{:.1f} ", X(double(i + 1)), Y(med[static_cast<std::size_t>(i)]));
    s += fmt::format(R"(<polyline points="{}" fill="none" stroke="{}" stroke-width="2.2" stroke-linejoin="round"/>)"
                     "\n",
                     pts, color);
    for (std::size_t t = 0; t < rep.thresholds.size(); ++t) {
      std::vector<double> ks;
      for (auto* m : mods) ks.push_back(double(m->metrics.energy_ranks[t]));
      const Index k = std::max<Index>(1, static_cast<Index>(std::lround(detail::median(ks))));
      if (k <= p) s += marker(int(t), X(double(k)), Y(med[static_cast<std::size_t>(k - 1)]), color) + "\n";
    }
    // legend
    s += fmt::format(R"(<line x1="{}" y1="{:.1f}" x2="{}" y2="{:.1f}" stroke="{}" stroke-width="3"/>)" "\n",
                     left + pw + 20, ly, left + pw + 48, ly, color);
    s += fmt::format(R"(<text x="{}" y="{:.1f}" fill="#222">{} ({})</text>)" "\n", left + pw + 56, ly + 4,
                     detail::svg_escape(types[g]), mods.size());
    ly += 22;
  }
  ly += 10;
  s += fmt::format(R"(<text x="{}" y="{:.1f}" fill="#222" font-weight="bold">energy rank (median)</text>)" "\n",
                   left + pw + 20, ly);
  ly += 20;
  for (std::size_t t = 0; t < rep.thresholds.size(); ++t) {
    s += marker(int(t), left + pw + 34, ly - 4, "#222") + "\n";
    s += fmt::format(R"(<text x="{}" y="{:.1f}" fill="#222">keeps {:g}% of Σσ²</text>)" "\n", left + pw + 56, ly,
                     rep.thresholds[t] * 100);
    ly += 20;
  }
  s += fmt::format(R"(<line x1="{}" y1="{:.1f}" x2="{}" y2="{:.1f}" stroke="#555" stroke-dasharray="6,4"/>)" "\n",
                   left + pw + 20, ly - 4, left + pw + 48, ly - 4);
  s += fmt::format(R"(<text x="{}" y="{:.1f}" fill="#222">every module</text>)" "\n", left + pw + 56, ly);
  s += "</svg>\n";
  return s;
}

}  // namespace lora::analysis
