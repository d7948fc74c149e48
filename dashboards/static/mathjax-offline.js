// gpuportal dashboards: MathJax is not bundled and nothing is fetched from a CDN;
// a formula in a dashboard's markdown shows as its TeX source.
